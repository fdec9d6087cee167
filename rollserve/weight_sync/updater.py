"""Validate-then-apply weight updates, and a fingerprint both sides can compare.

An update is checked completely before the first byte is written: the
incoming tensors are staged (kept by reference when they already have the
engine's dtype and device, cast or moved otherwise), every problem found is
collected, and only a clean update is copied into the engine's parameters.
"""

import hashlib
import math
import threading
import weakref
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch

# Components that wrappers insert into parameter names: DDP / DeepSpeed (`module.`), FSDP1,
# activation checkpointing, PEFT (`base_model.model.`, `.base_layer`, `modules_to_save.default.`)
# and torch.compile (`_orig_mod.`).
_DROPPED = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "base_layer", "_orig_mod"}
_HALF = (torch.float16, torch.bfloat16)
_SHOWN = 8  # offending names listed per problem in an error message


class WeightUpdateError(ValueError):
    """A rejected weight update; nothing was applied. `problems` maps each problem to the offending names.

    `where` (the engine that refused it, when raised on a sender) starts the message.
    """

    def __init__(self, problems: dict[str, list[str]], where: str | None = None):
        self.problems = problems
        parts = []
        for problem, names in problems.items():
            more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
            parts.append(f"{problem}: {', '.join(names[:_SHOWN])}{more}")
        message = ("update_weights rejected the update, nothing was applied (weights and version unchanged): "
                   + "; ".join(parts))
        super().__init__(message if where is None else f"{where}: {message}")


def normalize_name(name: str) -> str:
    """The engine's parameter name for a trainer's: wrapper components are dropped."""
    out: list[str] = []
    for part in name.split("."):
        if part in _DROPPED:
            continue
        out.append(part)
        if out[-2:] == ["modules_to_save", "default"]:
            del out[-2:]
    while out[:1] == ["module"] or out[:2] == ["base_model", "model"]:
        del out[:1 if out[0] == "module" else 2]
    return ".".join(out)


def next_version(current: int, version) -> int:
    """`version` if it is a valid next version, `current + 1` if it is None."""
    if version is None:
        return current + 1
    if not isinstance(version, int) or isinstance(version, bool):
        raise TypeError(f"version must be an int or None, got {type(version).__name__}")
    if version <= current:
        raise ValueError(f"version={version} must be greater than the current weight version {current} "
                         f"(versions only move forward, so every token's version is unambiguous)")
    return version


class _Targets:
    """Every name the engine accepts, mapped to its tensor; tied names map to the same tensor."""

    def __init__(self, model: torch.nn.Module):
        self.tensors: dict[str, torch.Tensor] = {}
        self.required: dict[int, str] = {}  # id(parameter) -> its first name
        for name, p in model.named_parameters(remove_duplicate=False):
            self.tensors[name] = p
            self.required.setdefault(id(p), name)
        for name, b in model.named_buffers(remove_duplicate=False):
            if b.is_floating_point():
                self.tensors[name] = b

    def get(self, name: str) -> torch.Tensor | None:
        t = self.tensors.get(name)
        return t if t is not None else self.tensors.get(normalize_name(name))

    def canonical(self, name: str) -> str:
        return name if name in self.tensors else normalize_name(name)


def _is_finite(t: torch.Tensor) -> bool:
    """True when `t` has no NaN or inf; reads `t` once (one pass from memory)."""
    if t.numel() == 0:
        return True
    if t.dtype in _HALF:
        # Half-precision sums are slow on CPUs without native support (a bf16 sum costs ~4-12x a
        # copy on AVX2); min and max (NaN propagates into both, +-inf is an extreme) cost ~0.7x.
        low, high = torch.aminmax(t)
        return math.isfinite(low.item()) and math.isfinite(high.item())
    # Any NaN or inf makes the sum NaN or inf (a memory-bound pass); a sum that overflows from
    # finite values is re-checked exactly.
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


class WeightBuffers:
    """Spare storage for double-buffered updates: a second tensor per engine tensor, made on first use.

    An update is copied (and cast) into the spares and checked there while the engine keeps
    generating; applying it swaps each parameter's storage with its spare, so the engine pauses
    only for pointer swaps, not for the copy. Costs one more copy of the updated weights in memory.
    """

    def __init__(self):
        self._spares: dict[int, torch.Tensor] = {}  # id(engine tensor) -> its spare
        self.lock = threading.Lock()  # one update at a time writes into the spares

    def spare(self, target: torch.Tensor) -> torch.Tensor:
        t = self._spares.get(id(target))
        if t is None or t.shape != target.shape or t.dtype != target.dtype or t.device != target.device:
            t = self._spares[id(target)] = torch.empty(target.shape, dtype=target.dtype, device=target.device)
        return t

    def swap_in(self, target: torch.Tensor, value: torch.Tensor) -> None:
        self._spares[id(target)] = target.data
        target.data = value
        # `.data =` keeps the version counter; caches keyed on (version, data_ptr) must see a change
        # even when the pointer comes back to a storage they saw two updates ago.
        torch.autograd.graph.increment_version(target)

    def clear(self) -> None:
        self._spares.clear()


def _describe(t) -> str | None:
    """Why `t` cannot be an update tensor at all, or None."""
    if not isinstance(t, torch.Tensor):
        return "values that are not tensors"
    if type(t).__name__ == "DTensor":
        return "sharded DTensors (pass full tensors, e.g. from rollserve.weight_sync.sources.iter_named_weights)"
    if hasattr(t, "ds_id") and t.numel() != t.ds_numel:  # inside GatheredParameters it is full, and fine
        return "ZeRO-3 partitioned parameters (gather them, e.g. with rollserve.weight_sync.sources.iter_named_weights)"
    if t.is_meta:
        return "meta tensors (no data)"
    if not t.is_floating_point():
        return "non-floating dtypes (weights must be float)"
    return None


class StagedUpdate:
    """A validated update: (engine tensor, new value) pairs ready to be copied (or swapped) in."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], buffers: "WeightBuffers | None" = None):
        self.pairs = pairs
        self.buffers = buffers

    @torch.no_grad()
    def apply(self) -> None:
        for target, value in self.pairs:
            if self.buffers is not None:
                self.buffers.swap_in(target, value)
            else:
                target.copy_(value)  # bumps the version counter, so caches keyed on it refresh


def stage_update(model: torch.nn.Module, named_tensors, require_all: bool = False,
                 buffers: WeightBuffers | None = None) -> StagedUpdate:
    """Reads and checks every `(name, tensor)`; raises `WeightUpdateError` listing all problems found.

    Without `buffers`, tensors that already have the engine tensor's dtype and device are
    kept by reference (no copy), so they must not change until the update is applied. With
    `buffers` (whose `lock` the caller holds until `apply()` returns), every value is copied
    into a spare and checked there.
    """
    if isinstance(named_tensors, Mapping):
        named_tensors = named_tensors.items()
    if isinstance(named_tensors, (str, bytes, torch.Tensor)) or not isinstance(named_tensors, Iterable):
        raise TypeError(f"named_tensors must be an iterable of (name, tensor) pairs or a mapping, "
                        f"got {type(named_tensors).__name__}")
    targets = _Targets(model)
    problems: dict[str, list[str]] = defaultdict(list)
    staged: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}  # id(target) -> (name, target, value)
    seen: set[str] = set()
    count, last = 0, None
    iterator = iter(named_tensors)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            break
        except Exception as e:
            where = f"after {count} items" + (f" (last name {last!r})" if last else "")
            problems[f"named_tensors raised {type(e).__name__}({e}) {where}"].append("<iterator>")
            break
        count += 1
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
            problems["items that are not (str name, tensor) pairs"].append(f"item #{count - 1}")
            continue
        last = item[0]
        problem = _stage_one(targets, *item, seen, None if problems else staged, buffers)
        if problem:
            problems[problem].append(item[0])
            staged.clear()  # the update is rejected: keep nothing, keep checking the rest
    if count == 0 and not problems:
        problems["named_tensors yielded nothing (an exhausted generator?)"].append("<iterator>")
    if require_all:
        given = {id(targets.tensors[n]) for n in seen}
        missing = [name for pid, name in targets.required.items() if pid not in given]
        if missing:
            problems["parameters missing (require_all=True)"].extend(missing)
    if problems:
        raise WeightUpdateError(dict(problems))
    return StagedUpdate([(target, value) for _, target, value in staged.values()], buffers)


@torch.no_grad()
def _stage_one(targets: _Targets, name: str, tensor, seen: set, staged: dict | None,
               buffers: WeightBuffers | None = None) -> str | None:
    """Checks one pair and stages its value into `staged` (None once the update is rejected)."""
    target = targets.get(name)
    if target is None:
        return "unknown names (not parameters of the engine's model)"
    canonical = targets.canonical(name)
    if canonical in seen:
        return "names given more than once"
    seen.add(canonical)
    bad = _describe(tensor)
    if bad:
        return bad
    if tensor.shape != target.shape:
        return f"wrong shapes (engine expects {tuple(target.shape)}, got {tuple(tensor.shape)})"
    previous = staged.get(id(target)) if staged is not None else None
    if buffers is not None and staged is not None and previous is None:
        value = buffers.spare(target)
        value.copy_(tensor.detach())
        finite = _is_finite(value)
    else:
        value = tensor.detach().to(device=target.device, dtype=target.dtype)
        finite = _is_finite(value)
    if not finite:
        return ("non-finite values (NaN/inf" +
                (f", after the cast to {target.dtype})" if target.dtype != tensor.dtype else ")"))
    if staged is None:
        return None
    if previous is not None:
        if not torch.equal(previous[2], value):
            return f"tied names given different values (tied to {previous[0]!r})"
        return None
    staged[id(target)] = (name, target, value)
    return None


def weights_fingerprint(named_tensors, dtype: torch.dtype | None = None) -> str:
    """A deterministic hash of names, shapes, dtypes and the raw bytes of every tensor.

    Names are normalised and sorted, so any iteration order of the same
    weights gives the same value; a tensor seen again under another name (tied
    weights) counts once. `dtype` casts first (to compare with an engine that
    runs in another dtype). Equal fingerprints mean bit-equal weights.
    """
    if isinstance(named_tensors, Mapping):
        named_tensors = named_tensors.items()
    digests: dict[str, bytes] = {}
    alive: dict[tuple, weakref.ref] = {}  # a freed tensor's address may be reused: only live ones are aliases
    for name, tensor in named_tensors:
        t = tensor.detach()
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key in alive and alive[key]() is not None:
            continue
        alive[key] = weakref.ref(tensor)
        if dtype is not None:
            t = t.to(dtype)
        h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())  # SHA-NI: ~2x blake2b on this CPU
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        digests[normalize_name(name)] = h.digest()
    total = hashlib.sha256()
    for name in sorted(digests):
        total.update(name.encode() + b"\0" + digests[name])
    return total.hexdigest()[:32]
