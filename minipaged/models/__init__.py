"""Model architectures (LLaMA, OPT) written against the paged attention interface.

`get_model_class("llama" | "opt")` is the registry the loader uses; the modules are
imported on demand so that reading a config never imports torch.
"""

from __future__ import annotations

import importlib

#: architecture -> (module, class)
_REGISTRY = {
    "llama": ("minipaged.models.llama", "LlamaForCausalLM"),
    "opt": ("minipaged.models.opt", "OPTForCausalLM"),
}


def get_model_class(architecture: str):
    """The nn.Module class for an architecture name ("llama" | "opt", or the HF class name)."""
    from minipaged.models.config import SUPPORTED_ARCHITECTURES

    key = SUPPORTED_ARCHITECTURES.get(architecture, str(architecture).lower())
    if key not in _REGISTRY:
        raise ValueError(f"architecture: {architecture!r} is not supported; supported: "
                         f"{', '.join(sorted(_REGISTRY))} "
                         f"({', '.join(SUPPORTED_ARCHITECTURES)})")
    module, name = _REGISTRY[key]
    return getattr(importlib.import_module(module), name)
