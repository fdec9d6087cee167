"""Engine replicas on Ray: `RolloutCluster`, a group-aware router, cluster-wide all-or-none weight updates.

Needs Ray (`pip install "rollserve[ray]"`); `import rollserve` never imports this package.
"""

try:
    import ray  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('rollserve.cluster needs Ray: pip install "rollserve[ray]" (ray>=2.40)') from e

from .cluster import ClusterError, ReplicaStats, RolloutCluster

__all__ = ["ClusterError", "ReplicaStats", "RolloutCluster"]
