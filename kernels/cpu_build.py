"""Build the C kernels for the CPU and load them through ctypes: every kernels/*.c file
is compiled on first use with the system C compiler (~1 s), cached under
~/.cache/minipaged/kernels by a hash of the source, the flags and the compiler, and
loaded with the signature of each function it exports.

Nothing here is from the paper; it is the plumbing under the C kernels (cpu_kernel.py:
PagedAttention; cpu_layers.py: the layer ops; cpu_4bit.py: the 4-bit-weight product;
models/fused_decode.py: the decode step in one call). ctypes releases the GIL during a
call. Where there is no compiler, or MINIPAGED_CPU_KERNEL=0 is set, `load()` returns
None and every caller keeps its torch path: the kernels are a speed-up, never a
requirement.

Invariant: a library is built from exactly the flags listed here for its source (the
layer ops must not fuse multiply-adds, attention may reassociate), and two processes
building at once never see a half-written file (each builds beside the target and
renames it into place).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch  # noqa: F401  (loaded first: the libraries bind to torch's OpenMP runtime)

KERNELS = Path(__file__).resolve().parent
#: source file -> compiler flags. Attention may reassociate its sums (-ffast-math: the
#: order differs from the reference's anyway, and it lets expf vectorise); the layer
#: ops must round exactly as transformers does (no contraction into fused multiply-adds).
SOURCES = {
    "cpu_paged_attention": ["-O3", "-march=native", "-ffast-math", "-fopenmp"],
    "cpu_paged_prefill": ["-O3", "-march=native", "-ffast-math", "-fopenmp"],
    "cpu_layers": ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
    # the GEMM fuses its multiply-adds; the weights' rebuild is marked fp-contract=off
    "cpu_4bit_linear": ["-O3", "-march=native", "-fopenmp"],
    # only calls the kernels above, through pointers: no arithmetic of its own
    "cpu_decode_step": ["-O2"],
}
ENV_SWITCH = "MINIPAGED_CPU_KERNEL"
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
#: name -> (restype, argtypes) of every exported function
SIGNATURES = {
    "paged_attention_decode_f32": (_I32, [_P, _I64, _P, _P, _P, _I64, _P, _P, _I32, _I32,
                                          _I32, _I32, _I32, _F32]),
    "paged_attention_prefill_f32": (_I32, [_P, _I64, _P, _P, _P, _I64, _P, _P, _P, _I32,
                                           _I32, _I32, _I32, _I32, _F32]),
    "write_kv_f32": (None, [_P, _P, _I64, _I64, _P, _P, _P, _I64, _I64]),
    "rms_norm_f32": (None, [_P, _P, _P, _P, _I64, _I64, _I64, _F32]),
    "rotary_f32": (None, [_P, _I64, _I64, _I64, _I64, _P, _P]),
    "silu_mul_f32": (None, [_P, _P, _I64, _I64, _I64]),
    "argmax_logsumexp_f32": (_I32, [_P, _I64, _I64, _I64, _P, _P]),
    "greedy_screen_f32": (_I32, [_P, _I64, _P, _P, _I64, _I64, _P, _P, _P, _I64, _P, _P]),
    "pack_4bit_f32": (_I32, [_P, _I64, _I64, _P]),
    "linear_4bit_f32": (None, [_P, _P, _I64, _P, _P, _I64, _I64, _I64]),
    "has_fast_4bit_linear": (_I32, []),
    "llama_decode_step_f32": (_I32, [_P, _P, _I64, _P, _P, _I64, _P, _P, _P, _P, _I64, _P,
                                     _P]),
}

_libs: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("MINIPAGED_CACHE", "~/.cache/minipaged")).expanduser() / "kernels"


_switch: list = [None, True]     # the last value of the variable seen, and what it meant


def enabled() -> bool:
    """False when MINIPAGED_CPU_KERNEL is set to 0 / false / no / off."""
    raw = os.environ.get(ENV_SWITCH)        # read each call: tests flip it at run time
    if raw != _switch[0]:
        _switch[:] = [raw, (raw or "1").strip().lower() not in ("0", "false", "no", "off")]
    return _switch[1]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(compiler: str, name: str = "cpu_paged_attention") -> Path:
    """Compile kernels/{name}.c (once per source, flags and compiler); the .so's path."""
    source, flags = KERNELS / f"{name}.c", [*SOURCES[name], "-shared", "-fPIC"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + version.encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target, then rename: two processes may build at once
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, str(source), "-o", tmp, "-lm"], check=True,
                           capture_output=True, text=True)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def load(name: str = "cpu_paged_attention") -> ctypes.CDLL | None:
    """The compiled kernels/{name}.c, or None (disabled, no compiler, or the build failed).

    Call it after `import torch` (this module does): the library then binds to the
    OpenMP runtime torch has loaded.
    """
    if not enabled():
        return None
    if name in _libs:
        return _libs[name]
    _libs[name] = None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(build(compiler, name)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        warnings.warn(f"kernels/{name}.c could not be built; using the torch ops instead: "
                      f"{detail.strip()[:500]}", RuntimeWarning, stacklevel=2)
        return None
    for fn_name, (restype, argtypes) in SIGNATURES.items():
        if hasattr(lib, fn_name):
            fn = getattr(lib, fn_name)
            fn.restype, fn.argtypes = restype, argtypes
    _libs[name] = lib
    return lib
