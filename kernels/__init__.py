"""The kernels of PagedAttention, installed as `minipaged.kernels`.

- `reference`: pure-NumPy executable definitions (read these first);
- `cache_ops`, `paged_attention`: Triton kernels with the same signatures;
- `cpu_build`: compiles and loads the C kernels for the CPU; `cpu_kernel`: calls the C
  PagedAttention kernels (`cpu_paged_attention.c`, `cpu_paged_prefill.c`);
  `cpu_layers`: the C layer ops (`cpu_layers.c`); `cpu_4bit`: the 4-bit-weight product.

Layout everywhere: key_cache / value_cache are [num_blocks, block_size, num_kv_heads,
head_dim]; the slot of token t of a sequence is block_table[t // B] * B + t % B.
"""

if __name__ == "kernels":
    # This folder was imported as a top-level `kernels`: `python -m ...` run from the
    # repository puts the repository on sys.path, and transformers imports the PyPI
    # package `kernels` (HF's hub kernels), which this folder would shadow. Hand the name
    # over to that package: look it up without the repository's folder on the path and
    # put it in sys.modules, which the import statement then returns. Where that package
    # is not installed, stay what we are: a module with no version, which transformers'
    # probe (it imports the name and asks for a version) reads as "not available".
    import importlib as _importlib
    import os as _os
    import sys as _sys

    _repo = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _saved = _sys.path[:]
    _self = _sys.modules.pop("kernels")
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _repo]
    try:
        _sys.modules["kernels"] = _importlib.import_module("kernels")
    except ModuleNotFoundError:
        _sys.modules["kernels"] = _self
    finally:
        _sys.path[:] = _saved
