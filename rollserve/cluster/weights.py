"""Weight buckets through Ray's object store, and the cluster's current weights for replicas that restart.

A bucket is `weight_sync.wire`'s: one uint8 buffer with every tensor at an aligned
offset, and its `BucketEntry` list. It goes into the object store as a numpy
array (one `ray.put` per bucket), which replicas on the same node map without a
copy; `read` rebuilds the tensors as views over it.

`CommittedWeights` keeps, for every tensor name ever updated, the bucket that
holds its newest value (buckets whose names all have newer values are dropped),
so a replica that comes back from the model's initial weights reaches the
cluster's current ones by one more staged update.
"""

import warnings

import numpy as np
import torch

from ..weight_sync.updater import normalize_name
from ..weight_sync.wire import bucket_entries, plan_buckets, read_bucket, write_bucket


def put_buckets(named_tensors, bucket_bytes: int) -> list[tuple[object, set[str]]]:
    """`(name, tensor)` pairs -> `(object ref, names)` per bucket of `(entries, uint8 array)` (copied to host)."""
    import ray

    buckets = []
    for batch, used in plan_buckets(named_tensors, bucket_bytes):
        bucket = torch.empty(used, dtype=torch.uint8)
        write_bucket(bucket, [(name, t.detach().cpu(), offset) for name, t, offset in batch])
        buckets.append((ray.put((bucket_entries(batch), bucket.numpy())), {name for name, _, _ in batch}))
    return buckets


def read(buckets, names: set[str] | None = None):
    """`(name, tensor view)` of every bucket, in order (with `names`, only those, by normalised name)."""
    for entries, array in buckets:
        with warnings.catch_warnings():  # the object store's buffer is read-only; the engine only reads it
            warnings.simplefilter("ignore", UserWarning)
            bucket = torch.from_numpy(np.asarray(array))
        for name, tensor in read_bucket(bucket, entries):
            if names is None or normalize_name(name) in names:
                yield name, tensor


class CommittedWeights:
    """The newest committed value of every updated tensor, as buckets in the object store."""

    def __init__(self):
        self.version = 0
        self._buckets: list[tuple[object, set[str]]] = []  # (ref, names whose newest value it holds)

    def record(self, version: int, buckets: list[tuple[object, set[str]]]) -> None:
        """An update of `version` was committed: `(ref, names)` buckets now hold these names' newest values."""
        buckets = [(ref, {normalize_name(n) for n in names}) for ref, names in buckets]
        new = set().union(*(names for _, names in buckets))
        kept = [(ref, names - new) for ref, names in self._buckets]
        self._buckets = [(ref, names) for ref, names in kept if names] + buckets
        self.version = version

    def buckets(self) -> list[tuple[object, set[str]]]:
        """`(ref, names to take from it)` that bring the model's initial weights to `version`."""
        return list(self._buckets)
