"""Executors: what runs a step once the scheduler has decided it (paper Fig. 4, the workers).

`ModelExecutor` owns the real model, the KV caches (`CacheEngine`) and the runner: it
applies the block moves the scheduler returned, in a safe order, then runs the forward
pass. `StubExecutor` has the same face and no model: its logits are a fixed function of
each sequence's last token, so scheduler-level simulations (benchmarks of memory, batch
size and engine overhead) run the real scheduler and block manager in microseconds.

Sizing the pool (section 4.2): the number of device blocks is `num_gpu_blocks`, or the
KV memory budget divided by the bytes of one block across all layers. Invariant: block
moves happen before the forward — swap-outs first (their device blocks may be reused
by this step's copies), then swap-ins, then copy-on-write copies.
"""

from __future__ import annotations

import logging

import torch

from minipaged.attention import get_attn_backend
from minipaged.config import DEFAULT_KV_CACHE_MEMORY, EngineConfig, available_memory
from minipaged.model_executor.cache_engine import CacheEngine, kv_bytes_per_block
from minipaged.model_executor.model_runner import BatchItem, ModelOutput, ModelRunner

logger = logging.getLogger(__name__)


def size_pools(config: EngineConfig, bytes_per_block: int, device: torch.device
               ) -> tuple[int, int]:
    """(device blocks, host blocks) for this config; ValueError if they can never fit."""
    if config.num_gpu_blocks is not None:
        num_gpu = config.num_gpu_blocks
    else:
        num_gpu = (config.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY) // bytes_per_block
        if num_gpu < 1:         # likely a unit slip: the value is in bytes, not GiB
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes holds no KV "
                             f"block: one block ({config.block_size} tokens) of this model "
                             f"takes {bytes_per_block} bytes")
    if num_gpu * bytes_per_block > available_memory(device):
        raise ValueError(f"num_gpu_blocks={num_gpu} needs {num_gpu * bytes_per_block} bytes of "
                         f"KV cache, more than this {device.type} device has "
                         f"({available_memory(device)} bytes)")
    num_cpu = config.swap_space // bytes_per_block
    if config.swap_space and num_cpu * bytes_per_block > available_memory(torch.device("cpu")):
        raise ValueError(f"swap_space={config.swap_space} is more than this machine's memory")
    return num_gpu, num_cpu


class ModelExecutor:
    """The real model on one device, with its paged KV cache."""

    def __init__(self, config: EngineConfig) -> None:
        from minipaged.model_executor.weight_loader import load_model

        self.device = config.resolve_device()
        dtype = config.resolve_dtype(self.device)
        torch.manual_seed(config.seed)
        loaded = load_model(config.model, dtype=dtype, device=self.device)
        self.model, self.model_config, self.tokenizer = loaded.model, loaded.config, loaded.tokenizer
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        if config.max_model_len and config.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={config.max_model_len} is longer than the model's "
                             f"context ({mc.max_position_embeddings})")
        self.eos_token_ids = list(mc.eos_token_ids)
        self.vocab_size = mc.vocab_size
        self.backend = get_attn_backend(config.attention_backend, self.device)
        per_block = kv_bytes_per_block(mc.num_layers, mc.num_kv_heads, mc.head_dim,
                                       config.block_size, dtype)
        self.num_gpu_blocks, self.num_cpu_blocks = size_pools(config, per_block, self.device)
        self.cache_engine = CacheEngine(mc.num_layers, mc.num_kv_heads, mc.head_dim,
                                        config.block_size, self.num_gpu_blocks,
                                        self.num_cpu_blocks, dtype, self.device, self.backend)
        self.runner = ModelRunner(self.model, config.block_size, self.backend, self.device)
        logger.info("KV cache: %d device blocks, %d host blocks of %d tokens (%d bytes each)",
                    self.num_gpu_blocks, self.num_cpu_blocks, config.block_size, per_block)

    def execute(self, items: list[BatchItem], swap_in: list[tuple[int, int]],
                swap_out: list[tuple[int, int]], copies: list[tuple[int, int]]) -> ModelOutput:
        self.cache_engine.swap_out(swap_out)
        self.cache_engine.swap_in(swap_in)
        self.cache_engine.copy(copies)
        if not items:
            return ModelOutput(torch.empty((0, 0)), [])
        return self.runner.execute(items, self.cache_engine.gpu_cache)


class StubExecutor:
    """No model: a row's logits favour token (its token + 1) % vocab, so greedy output is
    predictable (and that token is what an argmax_only row gets).

    Used for scheduler-level simulations and engine tests of pure bookkeeping.
    """

    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int = 0, vocab_size: int = 64,
                 max_model_len: int = 2048, eos_token_ids: list[int] | None = None) -> None:
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = list(eos_token_ids or [])
        self.tokenizer = None
        self.num_swapped_in = self.num_swapped_out = self.num_copied = 0

    def execute(self, items: list[BatchItem], swap_in: list[tuple[int, int]],
                swap_out: list[tuple[int, int]], copies: list[tuple[int, int]]) -> ModelOutput:
        self.num_swapped_in += len(swap_in)
        self.num_swapped_out += len(swap_out)
        self.num_copied += len(copies)
        sampled = [it for it in items if it.needs_logits]
        # an argmax_only row's token is its logits' argmax: the one 5.0
        tokens = [(it.token_ids[-1] + 1) % self.vocab_size for it in sampled if it.argmax_only]
        rows = [it.token_ids[-1] for it in sampled if not it.argmax_only]
        rows += [t for it in items for t in it.token_ids[:it.extra_logit_rows]]
        logits = torch.zeros((len(rows), self.vocab_size))
        if rows:
            logits[torch.arange(len(rows)), (torch.tensor(rows) + 1) % self.vocab_size] = 5.0
        return ModelOutput(logits, tokens)


def build_executor(config: EngineConfig) -> ModelExecutor:
    return ModelExecutor(config)
