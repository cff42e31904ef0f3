"""`LLM`: the offline API, shaped like vLLM's so a script moves by changing one import.

    from minipaged import LLM, SamplingParams
    llm = LLM()                                   # SmolLM2-135M-Instruct, paged KV cache
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))

`generate` queues every prompt, then steps the engine until all are done: continuous
batching (section 4.2 / Orca) decides each step which sequences run, so a short request
finishes and frees its blocks while long ones keep going.

Invariant: outputs come back in the order of the prompts, and the KV pool is entirely
free again when `generate` or `chat` returns (also when it raises).
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from tqdm import tqdm   # the console bar: no widget dependency inside notebooks

from minipaged.config import EngineConfig
from minipaged.engine import LLMEngine
from minipaged.outputs import RequestOutput
from minipaged.sampling import SamplingParams

PromptType = str | list[int]


class LLM:
    """An engine on one model, for offline batched generation.

    Arguments are EngineConfig's (see DESIGN.md section 3): model, block_size,
    num_gpu_blocks, kv_cache_memory, swap_space, enable_prefix_caching, preemption_mode,
    max_num_seqs, max_num_batched_tokens, max_model_len, enable_chunked_prefill,
    attention_backend, device, dtype, seed, watermark.
    """

    def __init__(self, model: str = "smollm2-135m", **kwargs: Any) -> None:
        unknown = set(kwargs) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown argument(s) to LLM: {', '.join(sorted(unknown))}")
        self.config = EngineConfig(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_config(self.config)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, *,
                 prompt_token_ids: Sequence[list[int]] | None = None) -> list[RequestOutput]:
        """Generate completions for a prompt or a list of prompts (text or token ids)."""
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("prompts: give either prompts or prompt_token_ids, not both")
            prompts = list(prompt_token_ids)
        if prompts is None:
            raise ValueError("prompts: nothing to generate from")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params: {len(sampling_params)} given for "
                                 f"{len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        return self._run(prompts, params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("messages: this model has no chat template")
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [tokenizer.apply_chat_template(c, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
                   for c in conversations]
        token_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        if isinstance(sampling_params, Sequence):
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        return self._run(token_ids, params, use_tqdm, texts=prompts)

    def stats(self) -> dict:
        """Block usage, utilisation, prefix-cache hits, preemptions, swaps, CoW copies."""
        return self.llm_engine.stats()

    # ------------------------------------------------------------------------------------
    def _run(self, prompts: list[PromptType], params: list[SamplingParams], use_tqdm: bool,
             texts: list[str] | None = None) -> list[RequestOutput]:
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                rid = str(next(self._counter))
                if texts is not None:
                    engine.add_request(rid, texts[i], p, prompt_token_ids=list(prompt))
                else:
                    engine.add_request(rid, prompt, p)
                ids.append(rid)
            finished: dict[str, RequestOutput] = {}
            with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm,
                      unit="req", dynamic_ncols=True) as bar:
                while engine.has_unfinished_requests():
                    for out in engine.step(finished_only=True):
                        if out.finished and out.request_id not in finished:
                            finished[out.request_id] = out
                            bar.update(1)
        except BaseException:
            engine.abort_request(ids)     # nothing leaks, even on Ctrl-C or a bad prompt
            raise
        return [finished[rid] for rid in ids]
