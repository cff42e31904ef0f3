"""minipaged: PagedAttention and a vLLM-style serving engine, small enough to read.

Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention" (SOSP 2023). The public face follows vLLM's offline API on purpose:

    from minipaged import LLM, SamplingParams

Heavy parts (torch, the model) are imported lazily, so `minipaged.core` stays a pure
Python + NumPy package that a reader can study without torch installed.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "LLM": "minipaged.entrypoints.llm",
    "SamplingParams": "minipaged.sampling",
    "RequestOutput": "minipaged.outputs",
    "CompletionOutput": "minipaged.outputs",
    "LLMEngine": "minipaged.engine",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minipaged' has no attribute {name!r}")
