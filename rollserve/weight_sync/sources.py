"""Trainer weights as `(hf_name, full_tensor)` pairs, gathered a bucket at a time.

`iter_named_weights(model)` looks at what `model` is and picks how to read it:
a plain `nn.Module` (any device and dtype), DeepSpeed ZeRO-3 partitioned
parameters (`deepspeed.zero.GatheredParameters` per bucket), FSDP2 `DTensor`
parameters (`full_tensor()`), and PEFT LoRA models (the adapter merged on the
fly, `W + scaling * B @ A`, the trainer's module untouched) — also combined,
e.g. LoRA under ZeRO-3. Names are the base model's HF names.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .updater import normalize_name
from .wire import DEFAULT_BUCKET_BYTES


@dataclass
class _Unit:
    """Parameters that must be full at the same time, and what they yield once they are."""

    params: list[torch.Tensor]
    emit: Callable[[list[torch.Tensor]], list[tuple[str, torch.Tensor]]]
    views: bool  # the yielded tensors alias the (gathered) parameters


def iter_named_weights(model: torch.nn.Module, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                       dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                       consumer_rank: int | None = 0, only_adapted: bool = False
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields every parameter of `model` as a full tensor under its HF name; tied weights once.

    `model` may be wrapped (DeepSpeed engine, DDP, `torch.compile`). Parameters are
    gathered `bucket_bytes` at a time (counted at full size); tensors are cast to
    `dtype` and moved to `device` when given. With ZeRO-3 or FSDP2 every rank must
    run the iterator to the end (the gathers are collectives); only `consumer_rank`
    gets tensors (None: every rank), the others get nothing. Yielded tensors are
    the module's own when nothing needs gathering or converting: read them before
    the next optimizer step. For a PEFT LoRA model, `only_adapted=True` yields just
    the merged weights of adapted layers and `modules_to_save`: enough for an
    engine that already holds the frozen base weights.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes!r} must be an int >= 1")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} must be None or a floating torch.dtype")
    module = _unwrap(model)
    if _is_peft(module):
        units = _peft_units(module, only_adapted)
    elif only_adapted:
        raise ValueError("only_adapted=True needs a PEFT model")
    else:
        units = [_Unit([p], lambda full, n=normalize_name(name): [(n, full[0])], views=True)
                 for name, p in module.named_parameters()]
    params = [p for u in units for p in u.params]
    zero3 = any(hasattr(p, "ds_id") for p in params)
    gather = _zero3_gather if zero3 else _full_tensors
    keep = consumer_rank is None or _rank() == consumer_rank
    return _iterate(units, gather, bucket_bytes, keep, dtype, device, zero3)


def _iterate(units, gather, bucket_bytes, keep, dtype, device, must_own):
    for bucket in _buckets(units, bucket_bytes):
        out = []
        with torch.no_grad(), gather([p for u in bucket for p in u.params]) as full:
            if keep:
                i = 0
                for u in bucket:
                    for name, t in u.emit(full[i:i + len(u.params)]):
                        c = t.to(device=device or t.device, dtype=dtype or t.dtype)
                        # gathered ZeRO-3 storage is released when the gather ends: own a copy
                        out.append((name, c.clone() if must_own and u.views and c is t else c))
                    i += len(u.params)
        yield from out


def _buckets(units: list[_Unit], bucket_bytes: int) -> Iterator[list[_Unit]]:
    bucket, size = [], 0
    for u in units:
        n = sum(_full_numel(p) * p.element_size() for p in u.params)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(u)
        size += n
    if bucket:
        yield bucket


def _full_numel(p: torch.Tensor) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # DTensor.numel() is already the global one


@contextmanager
def _zero3_gather(params):
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield [p.data for p in params]


@contextmanager
def _full_tensors(params):
    yield [p.full_tensor() if _is_dtensor(p) else p.detach() for p in params]


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while True:
        kind = type(model).__name__
        if kind in ("DeepSpeedEngine", "DistributedDataParallel", "PipelineEngine"):
            model = model.module
        elif kind == "OptimizedModule":
            model = model._orig_mod
        elif kind == "FullyShardedDataParallel":
            raise ValueError("FSDP1 (FullyShardedDataParallel) is not supported: shard with FSDP2 "
                             "(torch.distributed.fsdp.fully_shard), or pass the module's parameters yourself "
                             "inside FSDP.summon_full_params")
        else:
            return model


# -- PEFT / LoRA ------------------------------------------------------------------


def _is_peft(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("peft.") and hasattr(module, "peft_config")


def _active_adapter(model) -> str:
    active = list(getattr(model, "active_adapters", None) or [model.active_adapter])
    if len(active) != 1:
        raise ValueError(f"PEFT model has {len(active)} active adapters {active}: activate exactly one")
    adapter = active[0]
    kind = str(getattr(model.peft_config[adapter], "peft_type", ""))
    if not kind.endswith("LORA"):
        raise ValueError(f"PEFT adapter {adapter!r} is {kind}: only LoRA adapters can be merged")
    return adapter


def _lora_unit(name: str, layer, adapter: str) -> tuple[_Unit, list[torch.Tensor], bool]:
    """The merged weight of one LoRA layer, every parameter of the layer, and whether the adapter changes it."""
    base = layer.base_layer
    owned = [base.weight] + [p for n, p in layer.named_parameters() if n.startswith("lora_")]
    hf_name = normalize_name(f"{name}.weight")
    passthrough = _Unit([base.weight], lambda full: [(hf_name, full[0])], views=True)
    if getattr(layer, "disable_adapters", False) or (
            adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {})):
        return passthrough, owned, False
    if getattr(layer, "merged", False):  # the trainer merged it into the base weight already
        return passthrough, owned, True
    if getattr(layer, "use_dora", {}).get(adapter) or getattr(layer, "lora_bias", {}).get(adapter):
        raise ValueError(f"PEFT layer {name!r} uses DoRA or lora_bias: only plain LoRA can be merged")
    scaling = layer.scaling[adapter]
    if isinstance(base, torch.nn.Linear):
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        transpose = getattr(layer, "fan_in_fan_out", False)
    elif isinstance(base, torch.nn.Embedding):
        a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
        transpose = True
    else:
        raise ValueError(f"PEFT layer {name!r} wraps a {type(base).__name__}: only Linear and Embedding "
                         "LoRA layers can be merged")

    def merge(full):
        w, a_, b_ = full
        delta = b_.float() @ a_.float()  # [out, r] @ [r, in]
        delta = (delta.T if transpose else delta) * scaling
        return [(hf_name, (w.float() + delta).to(w.dtype))]

    return _Unit([base.weight, a, b], merge, views=False), owned, True


def _peft_units(model, only_adapted: bool) -> list[_Unit]:
    adapter = _active_adapter(model)
    units, consumed = [], set()
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            unit, owned, adapted = _lora_unit(name, m, adapter)
            if adapted or not only_adapted:
                units.append(unit)
            consumed.update(id(p) for p in owned)
        elif hasattr(m, "modules_to_save") and hasattr(m, "original_module"):
            consumed.update(id(p) for p in m.original_module.parameters())
            for other, copy in m.modules_to_save.items():
                if other != adapter:
                    consumed.update(id(p) for p in copy.parameters())
    saved = f".modules_to_save.{adapter}."
    for name, p in model.named_parameters():
        if id(p) in consumed:
            continue
        if any(part.startswith(("lora_", "trainable_tokens_")) for part in name.split(".")):
            raise ValueError(f"PEFT parameter {name!r} is of a kind that cannot be merged")
        if only_adapted and saved not in name:
            continue
        hf_name = normalize_name(name.replace(saved, ".modules_to_save.default."))
        units.append(_Unit([p], lambda full, n=hf_name: [(n, full[0])], views=True))
    return units
