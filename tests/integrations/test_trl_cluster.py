"""TRL's GRPOTrainer generating through a 2-replica RolloutCluster (RollserveConfig(num_replicas=2))."""

import os

import pytest

pytest.importorskip("trl")
pytest.importorskip("ray")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from helpers import ray_session  # noqa: E402,F401 (fixture)
from test_trl import (LOGP_TOLERANCE, dataset, logp_max, record_syncs, reward_len, tiny_qwen2,  # noqa: E402
                      tokenizer, train_args)  # noqa: F401 (fixture)
from trl import GRPOConfig  # noqa: E402

from rollserve.cluster import RolloutCluster  # noqa: E402
from rollserve.integrations import trl as rtrl  # noqa: E402


def test_grpo_through_two_replicas_syncs_every_step(ray_session, tokenizer):
    trainer = rtrl.GRPOTrainer(model=tiny_qwen2(tokenizer), reward_funcs=reward_len, args=train_args(GRPOConfig, 2),
                               train_dataset=dataset(), processing_class=tokenizer,
                               rollserve_config=rtrl.RollserveConfig(num_replicas=2, kv_cache_memory=1 << 24))
    backend = trainer.vllm_generation
    try:
        assert isinstance(backend.llm, RolloutCluster) and not backend.zero_copy
        seen = record_syncs(trainer)
        trainer.train()
        assert [v for v, _, _ in seen] == [1, 2]
        assert all(engine == trained for _, engine, trained in seen)  # both replicas: weights_fingerprint agrees
        assert len({trained for _, _, trained in seen}) == 2
        assert all(s.requests > 0 for s in backend.llm.stats())  # both replicas generated
        diffs = logp_max(trainer)
        assert len(diffs) == 2 and max(diffs) < LOGP_TOLERANCE, diffs
    finally:
        backend.llm.shutdown()


def test_num_replicas_is_checked():
    with pytest.raises(ValueError, match="num_replicas=0"):
        rtrl.RollserveConfig(num_replicas=0)
