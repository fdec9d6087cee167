"""One rank of the distributed source tests (run by test_distributed.py, two gloo ranks on the CPU).

Every rank builds the same tiny Llama, shards it (DeepSpeed ZeRO-3, ZeRO-3 with a
PEFT LoRA adapter, FSDP2), trains it 2 steps with AdamW, and iterates
`iter_named_weights`; rank 0 feeds it into an engine holding the initial
weights, then compares with the full state dict the framework itself
consolidates. Rank 0 prints one `RESULT <json>` line per mode.

usage: python dist_worker.py RANK WORLD_SIZE PORT MODE[,MODE...]
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rollserve import LLM, SamplingParams  # noqa: E402
from rollserve.weight_sync import weights_fingerprint  # noqa: E402
from rollserve.weight_sync.sources import iter_named_weights  # noqa: E402
from tests.conftest import build_tiny_model, random_prompts  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=8)
BATCH = torch.tensor(random_prompts([12, 12], seed=12))
PROMPTS = random_prompts([5, 9, 7], seed=11)


def greedy(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def zero3(model):
    """Returns (trained DeepSpeed engine, its consolidated full state dict on rank 0)."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=0.05), config=config)
    assert all(p.numel() == 0 for p in engine.module.parameters())  # really partitioned
    for _ in range(2):
        engine.backward(engine(input_ids=BATCH, labels=BATCH).loss)
        engine.step()
    return engine, engine._zero3_consolidated_16bit_state_dict


def fsdp2(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for _ in range(2):
        model(input_ids=BATCH, labels=BATCH).loss.backward()
        opt.step()
        opt.zero_grad()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return model, lambda: get_model_state_dict(model, options=options)


def run(mode: str, rank: int, initial) -> dict | None:
    llm = LLM(copy.deepcopy(initial), kv_cache_memory=1 << 22) if rank == 0 else None
    old = greedy(llm) if rank == 0 else None
    model = copy.deepcopy(initial)
    if mode == "zero3_lora":
        model = lora(model)
    trainer, full_state_dict = (fsdp2 if mode == "fsdp2" else zero3)(model)
    weights = iter_named_weights(trainer, bucket_bytes=40_000)
    if rank == 0:
        llm.update_weights(weights, require_all=True)
    else:
        assert not list(weights)  # gathers run here too, tensors go to rank 0 only
    state = full_state_dict()  # a collective as well
    if rank != 0:
        return None
    if mode == "zero3_lora":  # PEFT's own merge of the consolidated adapter
        reference = lora(copy.deepcopy(initial))
        reference.load_state_dict(state)
        reference = reference.merge_and_unload()
    else:
        reference = copy.deepcopy(initial)
        reference.load_state_dict(state)
    engine = dict(llm.model.named_parameters())
    new = greedy(llm)
    return {
        "mode": mode,
        "bit_equal": all(torch.equal(engine[n], p) for n, p in reference.named_parameters()),
        "changed": sum(not torch.equal(engine[n], p) for n, p in initial.named_parameters()),
        "fingerprint_equal": llm.weights_fingerprint() == weights_fingerprint(reference.named_parameters()),
        "greedy_changed": new != old,
        "greedy_equals_fresh": new == greedy(LLM(reference, kv_cache_memory=1 << 22)),
        "version": llm.weight_version,
    }


def main():
    rank, world, port, modes = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if any(m.startswith("zero3") for m in modes):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    initial = build_tiny_model("llama", seed=0)
    for mode in modes:
        result = run(mode, rank, initial)
        if result is not None:
            print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: DeepSpeed's and inductor's exit hooks take ~15 s here


if __name__ == "__main__":
    main()
