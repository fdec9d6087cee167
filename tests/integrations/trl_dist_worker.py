"""One rank of the distributed TRL test (run by test_trl_distributed.py: two gloo ranks, CPU, real processes).

Each rank runs TRL's GRPOTrainer with the rollserve backend under DeepSpeed ZeRO-3,
configured the way TRL users do it (`GRPOConfig(deepspeed=...)` and the environment
variables `accelerate launch` / `torchrun` set), on a tiny Qwen2 for 3 steps. The model
is built before the config, so it is still whole when the trainer is built (DeepSpeed
partitions it when training starts): the backend must see the ZeRO-3 plan in the
accelerator, not in the parameters. At every generation each rank records its engine's weight
version and fingerprint, the trainer's fingerprint (gathered by every rank) and the
prompts it generates for; each rank prints one `RESULT <json>` line at the end.

usage: python trl_dist_worker.py RANK WORLD_SIZE PORT OUTPUT_DIR
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main():
    rank, world, port, output_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    # What `accelerate launch` / `torchrun` set for each process.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), TRL_EXPERIMENTAL_SILENCE="1")
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    import rollserve
    from rollserve.integrations import trl as rtrl
    from rollserve.weight_sync import weights_fingerprint
    from rollserve.weight_sync.sources import iter_named_weights
    from tests.integrations.test_trl import dataset, reward_len, tiny_qwen2

    tokenizer = AutoTokenizer.from_pretrained(str(rollserve.smollm2_135m_instruct()))
    model = tiny_qwen2(tokenizer)
    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
             "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "zero_allow_untested_optimizer": True}
    # 2 ranks x 4 rows = one group of 4 completions per rank and step; each rank generates its own prompts.
    args = GRPOConfig(output_dir=output_dir, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[],
                      use_cpu=True, bf16=False, save_strategy="no", seed=0, disable_tqdm=True, deepspeed=zero3,
                      activation_checkpointing=True)  # TRL's default, named as transformers 5 wants it
    assert not any(hasattr(p, "ds_id") for p in model.parameters())  # not partitioned yet
    trainer = rtrl.GRPOTrainer(model=model, reward_funcs=reward_len, args=args,
                               train_dataset=dataset(), processing_class=tokenizer,
                               rollserve_config=rtrl.RollserveConfig(kv_cache_memory=1 << 24))
    backend = trainer.vllm_generation
    seen = []
    generate = backend.generate

    def recording_generate(prompts, *a, **kw):
        trainer_fp = weights_fingerprint(iter_named_weights(trainer.model, consumer_rank=None))  # every rank gathers
        seen.append({"version": backend.weight_version, "engine": backend.llm.weights_fingerprint(),
                     "trainer": trainer_fp, "prompts": [list(p) for p in prompts]})
        return generate(prompts, *a, **kw)

    backend.generate = recording_generate
    trainer.train()
    params = list(trainer.model.parameters())
    result = {
        "rank": rank, "zero_copy": backend.zero_copy, "steps": trainer.state.global_step,
        "engine_is_trainer": backend.llm.model is trainer.model,
        "partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in params),
        "seen": seen,
        "logp_max": [h["sampling/sampling_logp_difference/max"] for h in trainer.state.log_history
                     if "sampling/sampling_logp_difference/max" in h],
    }
    print("RESULT " + json.dumps(result), flush=True)
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: DeepSpeed's exit hooks are slow here


if __name__ == "__main__":
    main()
