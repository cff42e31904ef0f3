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

#: a prompt: text, token ids, or vLLM's dict forms {"prompt": text} (TextPrompt) and
#: {"prompt_token_ids": ids} (TokensPrompt; a "prompt" beside them is kept as its text)
PromptType = str | list[int] | dict


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
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, Sequence):
            raise ValueError(f"prompts: expected a prompt (text, token ids or a dict) or a "
                             f"list of them, got {type(prompts).__name__}")
        prompts = [_as_request(p, i) for i, p in enumerate(prompts)]
        return self._run(prompts, _per_prompt(sampling_params, len(prompts)), use_tqdm)

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
        requests = [(p, tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
        return self._run(requests, _per_prompt(sampling_params, len(prompts)), use_tqdm)

    def stats(self) -> dict:
        """Block usage, utilisation, prefix-cache hits, preemptions, swaps, CoW copies."""
        return self.llm_engine.stats()

    # ------------------------------------------------------------------------------------
    def _run(self, requests: list[tuple[str | None, list[int] | None]],
             params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        """requests: (text, token ids) per prompt, either one None (see _as_request)."""
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for (text, token_ids), p in zip(requests, params):
                rid = str(next(self._counter))
                engine.add_request(rid, text, p, prompt_token_ids=token_ids)
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


def _as_request(prompt: PromptType, index: int) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of one prompt; a ValueError naming prompts[index] otherwise."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt", "prompt_token_ids"}
        text, token_ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        if unknown or (text is None and token_ids is None):
            raise ValueError(f"prompts[{index}]: a dict prompt holds \"prompt\" (text) "
                             f"and/or \"prompt_token_ids\", got keys {sorted(prompt)}")
        return text, None if token_ids is None else list(token_ids)
    if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        return None, list(prompt)
    raise ValueError(f"prompts[{index}]: expected text, token ids or a dict, "
                     f"got {type(prompt).__name__}")


def _per_prompt(sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                num_prompts: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: the one given for all, or a list of as many."""
    if isinstance(sampling_params, Sequence):
        if len(sampling_params) != num_prompts:
            raise ValueError(f"sampling_params: {len(sampling_params)} given for "
                             f"{num_prompts} prompts")
        return list(sampling_params)
    return [sampling_params or SamplingParams()] * num_prompts
