"""Engine configuration: the knobs of `LLM(...)`, validated in one place.

The names follow vLLM's engine arguments where vLLM has them (block_size, swap_space,
enable_prefix_caching, max_num_seqs, max_num_batched_tokens, max_model_len, seed) so a
script moves between the two by changing an import. minipaged-only knobs:
num_gpu_blocks / kv_cache_memory (size the paged pool directly), preemption_mode
(the paper's two recovery mechanisms, section 4.5) and attention_backend.

Invariant: every invalid value raises ValueError naming the argument, before any
memory is reserved or any weight is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION_BACKENDS = ("auto", "torch", "triton", "numpy")
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
#: KV-cache memory when neither num_gpu_blocks nor kv_cache_memory is given
DEFAULT_KV_CACHE_MEMORY = 1 << 30
#: the paper's two ways to bring a preempted group back (section 4.5)
PREEMPTION_MODES = ("recompute", "swap")


@dataclass
class SchedulerConfig:
    """The scheduler's share of EngineConfig (minipaged/scheduler.py), as in vLLM."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    preemption_mode: str = "recompute"
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, "
                             f"got {self.preemption_mode!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1, "
                             f"got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("max_num_batched_tokens must be >= max_model_len without "
                             "chunked prefill, or a long prompt could never be scheduled")


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    block_size: int = 16
    num_gpu_blocks: int | None = None
    kv_cache_memory: int | None = None
    swap_space: int = 1 << 30
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True
    attention_backend: str = "auto"
    device: str = "auto"
    dtype: str | torch.dtype = "auto"
    seed: int = 0
    watermark: float = 0.01

    def __post_init__(self) -> None:
        def positive(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        positive("block_size")
        positive("max_num_seqs")
        positive("num_gpu_blocks", allow_none=True)
        positive("kv_cache_memory", allow_none=True)
        positive("max_num_batched_tokens", allow_none=True)
        positive("max_model_len", allow_none=True)
        if not isinstance(self.swap_space, int) or self.swap_space < 0:
            raise ValueError(f"swap_space must be a number of bytes >= 0, got {self.swap_space!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError("preemption_mode must be 'recompute' or 'swap', "
                             f"got {self.preemption_mode!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {self.attention_backend!r}")
        if not isinstance(self.dtype, torch.dtype) and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark!r}")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but no CUDA device is available")
        return device

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        """fp32 on the CPU (this machine has no fast half-precision matmul), fp16 on CUDA."""
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        chosen = DTYPES[self.dtype]
        if chosen is None:
            return torch.float16 if device.type == "cuda" else torch.float32
        return chosen


def available_memory(device: torch.device) -> int:
    """Bytes the KV cache could at most take on this device (total device memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
