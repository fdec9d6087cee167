"""TRL's GRPOTrainer with the rollserve backend under FSDP2 on one GPU, 2 steps, for gpu_check.sh.

    torchrun --standalone --nproc_per_node 1 benchmarks/gpu_trl_fsdp2.py OUTPUT_DIR

accelerate enables FSDP only on GPU setups, so the CPU suite cannot run this. SmolLM2-135M-Instruct in
fp32, configured as TRL users do (`GRPOConfig(fsdp=..., fsdp_config={"fsdp_version": 2})`). At every
generation the engine's fingerprint must equal the trainer's gathered one, and once more after a sync
that follows the last step; the trainer's parameters must really be FSDP2 DTensors. Prints PASS/FAIL
lines; the exit status is 1 on any failure.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from workload import QUESTIONS  # noqa: E402

STEPS = 2


def main() -> int:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    import rollserve
    from rollserve.integrations import trl as rtrl
    from rollserve.weight_sync import weights_fingerprint
    from rollserve.weight_sync.sources import iter_named_weights

    path = rollserve.smollm2_135m_instruct()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = GRPOConfig(output_dir=sys.argv[1], per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=16, max_steps=STEPS, learning_rate=1e-5, logging_steps=1, report_to=[],
                      bf16=False, save_strategy="no", seed=0, disable_tqdm=True, fsdp="full_shard",
                      fsdp_config={"fsdp_version": 2})
    trainer = rtrl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                               args=args, train_dataset=Dataset.from_dict({"prompt": QUESTIONS}),
                               processing_class=tokenizer,
                               rollserve_config=rtrl.RollserveConfig(kv_cache_memory="1GiB"))
    backend = trainer.vllm_generation
    seen = []
    generate = backend.generate

    def trainer_fingerprint() -> str:
        return weights_fingerprint(iter_named_weights(trainer.model, consumer_rank=None))

    def recording_generate(*a, **kw):
        seen.append((backend.weight_version, backend.llm.weights_fingerprint(), trainer_fingerprint()))
        return generate(*a, **kw)

    backend.generate = recording_generate
    trainer.train()
    backend.sync_weights()
    seen.append((backend.weight_version, backend.llm.weights_fingerprint(), trainer_fingerprint()))
    ok = True
    sharded = [n for n, p in trainer.model.named_parameters() if type(p).__name__ == "DTensor"]
    ok &= report("the trainer's parameters are FSDP2 DTensors", bool(sharded),
                 f"{len(sharded)} DTensor parameters, distributed type {trainer.accelerator.distributed_type}")
    ok &= report(f"{STEPS} steps", trainer.state.global_step == STEPS, f"global_step {trainer.state.global_step}")
    for version, engine, theirs in seen:
        ok &= report(f"weight version {version}: engine fingerprint == trainer's", engine == theirs,
                     f"{engine[:12]} vs {theirs[:12]}")
    ok &= report("the weights moved each step", len({t for _, _, t in seen}) == len(seen), f"{len(seen)} syncs")
    return 0 if ok else 1


def report(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} TRL FSDP2: {name}: {detail}", flush=True)
    return ok


if __name__ == "__main__":
    code = main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)
