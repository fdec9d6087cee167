"""Engine configuration."""

from dataclasses import dataclass

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype) -> torch.dtype | None:
    """`"auto"` -> None (keep the model's); a name or a floating `torch.dtype` -> that dtype."""
    if dtype == "auto" or dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r} is not supported: use 'auto', one of {sorted(_DTYPES)} or a floating torch.dtype")


@dataclass
class EngineConfig:
    """Sizes of the paged KV cache and of each engine step.

    block_size: tokens per KV block.
    kv_cache_memory: bytes given to the KV cache.
    max_num_seqs: sequences decoded together at most.
    max_num_batched_tokens: tokens (decode + prefill chunks) in one forward pass at most.
    enable_prefix_caching: reuse KV blocks of identical prompt prefixes across requests.
    max_model_len: longest prompt + completion; None = the model's `max_position_embeddings`.
    seed: seeds the sampling of requests that bring no seed of their own.
    """

    block_size: int = 16
    kv_cache_memory: int = 2 * 1024**3
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("block_size", 1), ("kv_cache_memory", 1), ("max_num_seqs", 1),
                          ("max_num_batched_tokens", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"EngineConfig.{name}={value!r} is invalid: must be an int >= {low}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"EngineConfig.max_model_len={self.max_model_len!r} is invalid: must be None or an int >= 2")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"EngineConfig.enable_prefix_caching={self.enable_prefix_caching!r} must be a bool")
