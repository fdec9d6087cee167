"""RolloutCluster(weight_transport="distributed"): updates broadcast in a real gloo group (this process rank 0,
each Ray replica a rank), with the object store's two-phase guarantees.

One 2-replica cluster of the tiny Llama for the module (see test_cluster.py). That the bytes came
through the group is read from each replica's receive buffers (`__ray_call__` runs a function on
the actor): they are empty until a broadcast fills them.
"""

import os
import sys

import pytest

ray = pytest.importorskip("ray")

from helpers import ray_session  # noqa: E402,F401 (fixture)
from rollserve.cluster import ClusterError, RolloutCluster  # noqa: E402
from rollserve.weight_sync import WeightUpdateError, weights_fingerprint  # noqa: E402
from test_cluster import BUCKET, KV, kill, nan_last, restart_unnoticed, versions  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas cannot import this module


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_model):
    c = RolloutCluster(tiny_model("llama", seed=0), 2, kv_cache_memory=KV, bucket_bytes=BUCKET,
                       weight_transport="distributed")
    yield c
    c.shutdown()


def on_replica(cluster, index, fn):
    return ray.get(cluster.replicas.slots[index].actor.__ray_call__.remote(fn))


def received_bytes(replica) -> int:
    receiver = replica._receiver
    return 0 if receiver is None else sum(b.numel() for b in receiver._pool)


def state(cluster):
    return cluster.weights_fingerprint(), cluster.weight_version, versions(cluster)


def test_an_update_is_broadcast_in_the_group_and_gives_every_replica_the_trainers_weights(cluster, tiny_model):
    assert [on_replica(cluster, i, received_bytes) for i in range(2)] == [0, 0]
    trainer = tiny_model("llama", seed=1)
    version = cluster.update_weights(trainer.named_parameters())
    assert version == cluster.weight_version == 1 and versions(cluster) == [1, 1]
    assert cluster.weights_fingerprint() == weights_fingerprint(trainer.named_parameters())
    size = sum(p.numel() * p.element_size() for p in trainer.parameters())
    assert all(on_replica(cluster, i, received_bytes) >= size for i in range(2))


def test_a_nan_in_the_last_bucket_leaves_every_replica_on_the_old_weights_and_the_group_in_step(cluster, tiny_model):
    before = state(cluster)
    bad = nan_last(tiny_model("llama", seed=2))
    with pytest.raises(WeightUpdateError) as info:
        cluster.update_weights(bad)
    assert info.value.problems == {"non-finite values (NaN/inf)": [bad[-1][0]]}
    assert state(cluster) == before
    trainer = tiny_model("llama", seed=2)
    assert cluster.update_weights(trainer.named_parameters()) == before[1] + 1  # the same group, still usable
    assert cluster.weights_fingerprint() == weights_fingerprint(trainer.named_parameters())


def test_one_update_staged_at_a_time(cluster, tiny_model):
    token = cluster.stage_weights(tiny_model("llama", seed=3).named_parameters())
    with pytest.raises(ValueError, match=f"stages one update at a time: commit or discard token {token} first"):
        cluster.stage_weights(tiny_model("llama", seed=3).named_parameters())
    before = state(cluster)
    cluster.discard_weights(token)
    assert state(cluster) == before


def test_a_replica_that_dies_mid_broadcast_leaves_every_replica_on_the_old_weights(cluster, tiny_model):
    before = state(cluster)
    # replica 1 dies as it starts receiving: the driver's broadcast and replica 0's receive fail at once
    on_replica(cluster, 1, lambda r: setattr(r._receiver, "receive", lambda: os._exit(1)))
    with pytest.raises(ClusterError, match=r"replicas \[1\] died while staging"):
        cluster.update_weights(tiny_model("llama", seed=4).named_parameters())
    assert cluster.weights_fingerprint() == before[0] and cluster.weight_version == before[1]
    cluster.wait_ready(timeout=120)  # Ray restarted replica 1 from the initial weights: replayed from the store
    assert state(cluster) == before
    trainer = tiny_model("llama", seed=4)
    assert cluster.update_weights(trainer.named_parameters()) == before[1] + 1  # through a new group of both
    assert cluster.weights_fingerprint() == weights_fingerprint(trainer.named_parameters())
    assert on_replica(cluster, 1, received_bytes) > 0


def test_a_replica_killed_between_stage_and_commit_and_one_restarted_unnoticed(cluster, tiny_model):
    before = state(cluster)
    token = cluster.stage_weights(tiny_model("llama", seed=5).named_parameters())
    kill(cluster, 0)
    with pytest.raises(ClusterError, match=r"replicas \[0\] died while committing"):
        cluster.commit_weights(token)
    assert cluster.weights_fingerprint() == before[0]
    cluster.wait_ready(timeout=120)
    assert state(cluster) == before  # the restarted replica 0 has the cluster's weights, from the object store
    restart_unnoticed(cluster, 1)  # the driver still believes it is in the group
    trainer = tiny_model("llama", seed=6)
    assert cluster.update_weights(trainer.named_parameters()) == before[1] + 1
    assert versions(cluster) == [before[1] + 1] * 2
    assert cluster.weights_fingerprint() == weights_fingerprint(trainer.named_parameters())
