"""LLMEngine: the serving loop of the paper's Fig. 4 (section 4), one iteration per step.

    add_request  -> tokenize, a SequenceGroup in the waiting queue
    step:
      Scheduler.schedule()     which groups run, with how many tokens; blocks to move
      Executor.execute()       swap / copy blocks, model forward through the paged cache
      Sampler                  next tokens (a plain greedy row's comes with the forward);
                               forks children (parallel sampling, beams)
      _process                 append tokens, stop checks, free the finished, outputs

Invariant: every block a request ever held is back in the block manager when the
request finishes, is aborted or is rejected — `stats()["num_free_blocks"]` returns to
the pool size whenever `has_unfinished_requests()` is False.
"""

from __future__ import annotations

import time
from typing import Iterable, Protocol

import torch

from minipaged.config import EngineConfig, SchedulerConfig
from minipaged.core.block_manager import BlockManager
from minipaged.beam_search import beam_search_step
from minipaged.model_executor.executor import build_executor
from minipaged.logits_processing import argmax_suffices
from minipaged.model_executor.model_runner import BatchItem, ModelOutput
from minipaged.model_executor.tokenizer import detokenize_incrementally, initial_offsets
from minipaged import prompt_logprobs
from minipaged.outputs import RequestOutput
from minipaged.sampler import Sampler, SamplingRow, fork_parallel_samples
from minipaged.sampling import SamplingParams
from minipaged.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus, make_seq_id_counter
from minipaged.step_gc import collect_after
from minipaged.stop import check_stop


class Executor(Protocol):
    """What the engine needs from whatever runs the model (real or a stub)."""

    num_gpu_blocks: int
    num_cpu_blocks: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    tokenizer: object

    def execute(self, items: list[BatchItem], swap_in: list[tuple[int, int]],
                swap_out: list[tuple[int, int]], copies: list[tuple[int, int]]
                ) -> ModelOutput: ...


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        self.tokenizer = executor.tokenizer
        self.max_model_len = executor.max_model_len
        self.block_manager = BlockManager(
            executor.num_gpu_blocks, config.block_size, num_swap_blocks=executor.num_cpu_blocks,
            enable_prefix_caching=config.enable_prefix_caching, watermark=config.watermark)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens or max(2048, self.max_model_len),
            max_model_len=self.max_model_len,
            preemption_mode=config.preemption_mode,
            enable_chunked_prefill=config.enable_chunked_prefill), self.block_manager)
        self.sampler = Sampler(executor.eos_token_ids, seed=config.seed)
        self._next_seq_id = make_seq_id_counter()
        self._groups: dict[str, SequenceGroup] = {}
        self._num_steps = self._num_generated_tokens = self._num_prompt_tokens = 0
        self._num_finished = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        return cls(config, build_executor(config))

    # ---- requests ----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | None,
                    params: SamplingParams | None = None, *,
                    prompt_token_ids: list[int] | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request; raises ValueError for a bad prompt (the engine keeps serving)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        if prompt_token_ids is None:
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("prompt: this model has no tokenizer; pass token ids")
                prompt_token_ids = self.tokenizer.encode(prompt)
            elif prompt is not None:
                prompt_token_ids = list(prompt)
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.executor.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}) "
                             "(the model's vocabulary)")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(prompt_token_ids)} tokens, the model's context "
                             f"(max_model_len) is {self.max_model_len}: no room to generate")
        blocks = -(-len(prompt_token_ids) // self.config.block_size)
        if blocks > self.executor.num_gpu_blocks:
            raise ValueError(f"prompt needs {blocks} KV blocks but the cache has only "
                             f"{self.executor.num_gpu_blocks} (num_gpu_blocks)")
        if params.best_of > self.config.max_num_seqs:
            raise ValueError(f"best_of={params.best_of} sequences can never run together: "
                             f"max_num_seqs is {self.config.max_num_seqs}")
        group = SequenceGroup.from_prompt(
            request_id, prompt_token_ids, params, self._next_seq_id, prompt=text,
            eos_token_ids=self.executor.eos_token_ids, arrival_time=arrival_time)
        group.seqs[0].detokenizer_state = initial_offsets(len(prompt_token_ids))  # the only one
        self._groups[request_id] = group
        self._num_prompt_tokens += len(prompt_token_ids)
        self.scheduler.add_group(group)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop requests now; their blocks go back to the pool at once."""
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            group = self._groups.pop(rid, None)
            if group is not None:
                self.scheduler.abort(rid)
                group.abort()
                group.mark_finished()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished

    # ---- one iteration -----------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one scheduler iteration; returns the outputs of every request it touched
        (streaming), or with finished_only only those that finished: building an output
        copies its tokens, which offline batch generation does not need every step."""
        with collect_after():       # the step's temporaries die young (step_gc.py)
            return self._step(finished_only)

    def _step(self, finished_only: bool) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self._num_steps += 1
        now = time.monotonic()
        outputs: dict[str, RequestOutput] = {}
        for group in out.rejected:
            group.mark_finished(now)
            self._groups.pop(group.request_id, None)
            outputs[group.request_id] = RequestOutput.from_seq_group(group)
        if out.is_empty:
            return list(outputs.values())
        result = self.executor.execute(items := self._batch_items(out), out.blocks_to_swap_in,
                                       out.blocks_to_swap_out, out.blocks_to_copy)
        rows, picked = [], []   # picked: greedy rows whose token came with the forward
        for sch, it in zip(out.scheduled, items):
            sch.group.mark_scheduled(now)
            sch.seq.mark_computed(sch.num_new_tokens)
            if sch.needs_logits:
                (picked if it.argmax_only else rows).append(sch)
        for sch, token in zip(picked, result.argmax_tokens):
            sch.group.mark_token()
            sch.seq.append_token(token, None)
            self._after_token(sch.group, sch.seq)
        if rows:
            self._sample(rows, result.logits[:len(rows)])
        if (logits := result.logits).shape[0] > len(rows):   # prompt logprobs some asked for
            prompt_logprobs.record([(s.group, it.start_pos, it.extra_logit_rows)
                                    for s, it in zip(out.scheduled, items)], logits[len(rows):])

        now = time.monotonic()
        for sch in out.scheduled:
            group = sch.group
            if group.request_id in outputs or group.request_id not in self._groups:
                continue
            if group.is_finished():
                group.mark_finished(now)
                self._groups.pop(group.request_id)
                self._num_finished += 1
            elif finished_only:
                continue
            outputs[group.request_id] = RequestOutput.from_seq_group(group)
        self.scheduler.remove_finished()
        return list(outputs.values())

    def _batch_items(self, out: SchedulerOutput) -> list[BatchItem]:
        items = []
        for sch in out.scheduled:
            seq, start, n = sch.seq, sch.seq.num_computed_tokens, sch.num_new_tokens
            table = self.block_manager.get_block_table(seq.seq_id)
            if n == 1 and start == seq.get_len() - 1:   # a decode: no need to copy the prefix
                tokens, extra = [seq.last_token_id], 0  # (nor any prompt logprob to give)
            else:
                tokens = seq.get_token_ids()[start:start + n]
                extra = prompt_logprobs.extra_rows(sch.group, start, n)
            only = sch.needs_logits and argmax_suffices(sch.group.sampling_params,
                                                        seq.get_output_len())
            items.append(BatchItem(tokens, start, table, sch.needs_logits, extra, only))
        return items

    def _sample(self, rows: list[ScheduledSeq], logits: torch.Tensor) -> None:
        sampling_rows = [SamplingRow.for_seq(r.group, r.seq) for r in rows]
        result = self.sampler(logits, sampling_rows)
        beams: dict[str, list[int]] = {}
        for i, (sch, samples) in enumerate(zip(rows, result.samples)):
            group, seq = sch.group, sch.seq
            group.mark_token()
            if group.sampling_params.use_beam_search:
                beams.setdefault(group.request_id, []).append(i)
                continue
            if len(samples) > 1:                       # first step of best_of > 1
                for new in fork_parallel_samples(group, seq, samples, self._next_seq_id):
                    if new.seq_id != seq.seq_id:
                        self.scheduler.fork_seq(seq, group.find(new.seq_id))
                for new in group.get_seqs(SequenceStatus.RUNNING):
                    self._after_token(group, new)
            else:
                seq.append_token(samples[0].token_id, samples[0].logprobs)
                self._after_token(group, seq)
        for rid, idx in beams.items():
            self._beam_step(rows[idx[0]].group, [rows[i].seq for i in idx], result.logprobs[idx])

    def _beam_step(self, group: SequenceGroup, parents: list[Sequence],
                   logprobs: torch.Tensor) -> None:
        def stop_checker(seq: Sequence) -> SequenceStatus | None:
            return self._check_stop(group, seq)

        step = beam_search_step(group, parents, logprobs, self._next_seq_id,
                                stop_checker=stop_checker, max_model_len=self.max_model_len)
        for parent_id, child_id in step.forks:
            self.scheduler.fork_seq_by_id(parent_id, child_id)
        for seq_id in step.freed:
            self.scheduler.free_seq_id(seq_id)
        self._num_generated_tokens += len(step.beams)
        if step.done:
            for seq in group.get_seqs(SequenceStatus.RUNNING):
                seq.status = SequenceStatus.FINISHED_ABORTED   # live beams not kept
                self.scheduler.free_seq(seq)
                group.remove(seq.seq_id)
        for seq in group.get_finished_seqs():
            self.scheduler.free_seq(seq)

    def _after_token(self, group: SequenceGroup, seq: Sequence) -> None:
        self._num_generated_tokens += 1
        if self._check_stop(group, seq) is not None:
            self.scheduler.free_seq(seq)

    def _check_stop(self, group: SequenceGroup, seq: Sequence) -> SequenceStatus | None:
        """Detokenize the new token (if there is a tokenizer) and decide whether seq ends."""
        params = group.sampling_params
        new_chars = None
        if self.tokenizer is not None:
            prefix, read = seq.detokenizer_state
            # Only the window from prefix_offset on is decoded: pass that tail, not the
            # whole sequence, so a step costs the same at any length.
            tail = _tokens_from(seq, prefix)
            new_text, p, r = detokenize_incrementally(
                self.tokenizer, tail, 0, read - prefix, params.skip_special_tokens)
            seq.detokenizer_state = (prefix + p, prefix + r)
            seq.output_text += new_text
            new_chars = len(new_text)
        return check_stop(seq, params, self.executor.eos_token_ids, self.max_model_len,
                          new_char_count=new_chars)

    # ---- numbers -----------------------------------------------------------------------
    def stats(self) -> dict:
        """Block usage, utilisation, prefix-cache hits, preemptions, swaps, CoW copies."""
        bm, sch = self.block_manager, self.scheduler
        queries = bm.prefix_cache_queries
        return {
            "num_gpu_blocks": bm.num_blocks, "num_free_blocks": bm.num_free_blocks,
            "num_cpu_blocks": self.executor.num_cpu_blocks,
            "num_free_cpu_blocks": bm.num_free_host_blocks,
            "block_size": self.config.block_size, "kv_cache_usage": bm.usage,
            "num_running": len(sch.running), "num_waiting": len(sch.waiting),
            "num_swapped": len(sch.swapped),
            "num_steps": self._num_steps, "num_finished_requests": self._num_finished,
            "num_prompt_tokens": self._num_prompt_tokens,
            "num_generated_tokens": self._num_generated_tokens,
            "prefix_cache_queries": queries, "prefix_cache_hits": bm.prefix_cache_hits,
            "prefix_cache_hit_rate": bm.prefix_cache_hits / queries if queries else 0.0,
            "num_preemptions": sch.num_preemptions,                 # of which by each mode:
            "num_recompute_preemptions": sch.num_recompute_preemptions,
            "num_swap_preemptions": sch.num_swap_preemptions,
            "num_swapped_out_blocks": bm.num_swapped_out_blocks,   # swaps, blocks each way
            "num_swapped_in_blocks": bm.num_swapped_in_blocks,
            "num_cow_copies": bm.num_cow_copies,
        }


def _tokens_from(seq: Sequence, start: int) -> list[int]:
    """seq.get_token_ids()[start:], without building the whole list."""
    prompt_len = seq.get_prompt_len()
    if start >= prompt_len:
        return seq.output_token_ids[start - prompt_len:]
    return seq.prompt_token_ids[start:] + seq.output_token_ids
