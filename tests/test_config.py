"""`EngineConfig`, the one definition of the engine arguments: sizes, checks that name the field, and the
places built from it (`LLM`, TRL's `RollserveConfig`)."""

import dataclasses

import pytest

from rollserve import LLM, EngineConfig, SamplingParams
from rollserve.config import parse_size

GIB = 1 << 30


@pytest.mark.parametrize("size, nbytes", [
    (4096, 4096), ("4096", 4096), ("2GiB", 2 * GIB), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000),
    ("16 mib", 16 << 20), ("0.5KiB", 512), (" 3KB ", 3000), ("1TiB", 1 << 40), ("7B", 7), (".5GiB", GIB // 2),
])
def test_parse_size(size, nbytes):
    assert parse_size(size) == nbytes


@pytest.mark.parametrize("size", ["2 parsecs", "", "GiB", "1.2.3GB", "-1GiB", "2 Gi B", "1e9", 2.5, True, None])
def test_parse_size_refuses(size):
    with pytest.raises(ValueError, match=r"is not a size: give bytes \(an int\) or a number and a unit"):
        parse_size(size)


def test_defaults_and_sizes():
    config = EngineConfig()
    assert config.kv_cache_memory == 2 * GIB and config.dtype == "auto" and config.enable_prefix_caching
    assert EngineConfig(kv_cache_memory="16MiB").kv_cache_memory == 16 << 20
    assert EngineConfig(kv_cache_memory=12345).kv_cache_memory == 12345


@pytest.mark.parametrize("name, value, allowed", [
    ("kv_cache_memory", "2 parsecs", "must be bytes (an int) or a number and a unit, e.g. '2GiB'"),
    ("kv_cache_memory", 0, "must be at least 1 byte"),
    ("kv_cache_memory", 1.5e9, "must be bytes"),
    ("dtype", "float13", "must be 'auto', one of ['bf16', 'bfloat16', 'float', 'float16', 'float32', 'fp16', "
                         "'fp32', 'half'] or a floating torch.dtype"),
    ("kv_cache_dtype", "fp8", "must be 'auto', one of ['bf16', 'bfloat16', 'float', 'float16', 'float32', "
                              "'fp16', 'fp32', 'half'] or a floating torch.dtype"),
    ("block_size", 0, "must be an int >= 1"),
    ("max_num_seqs", True, "must be an int >= 1"),
    ("max_num_batched_tokens", "2048", "must be an int >= 1"),
    ("max_model_len", 1, "must be None or an int >= 2"),
    ("seed", -1, "must be an int >= 0"),
    ("enable_prefix_caching", "yes", "must be True or False"),
    ("double_buffer_weights", 1, "must be True or False"),
])
def test_bad_value_names_field_value_and_range(name, value, allowed):
    with pytest.raises(ValueError) as info:
        EngineConfig(**{name: value})
    assert str(info.value).startswith(f"EngineConfig.{name}={value!r} is invalid: {allowed}")


def test_torch_dtypes():
    torch = pytest.importorskip("torch")
    assert EngineConfig(dtype=torch.bfloat16).dtype is torch.bfloat16
    with pytest.raises(ValueError, match="EngineConfig.dtype=torch.int8 is invalid"):
        EngineConfig(dtype=torch.int8)


def test_llm_takes_the_engine_arguments_as_keywords(tiny_model):
    llm = LLM(tiny_model("llama"), kv_cache_memory="16MiB", block_size=8, max_num_seqs=4, seed=3)
    assert llm.engine.config.kv_cache_memory == 16 << 20 and llm.engine.config.max_num_seqs == 4
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match=r"EngineConfig.kv_cache_memory='2 parsecs' is invalid"):
        LLM(tiny_model("llama"), kv_cache_memory="2 parsecs")
    with pytest.raises(TypeError, match="unexpected keyword argument 'kv_cache'"):
        LLM(tiny_model("llama"), kv_cache=1 << 24)
    with pytest.raises(TypeError):  # engine arguments are keywords only
        LLM(tiny_model("llama"), None, "float32")


def test_rollserve_config_has_the_engine_fields_and_defaults():
    trl = pytest.importorskip("rollserve.integrations.trl")
    engine, trainer = EngineConfig(), trl.RollserveConfig()
    for f in dataclasses.fields(EngineConfig):
        if f.name != "seed":  # None there: the trainer's args.seed + the process index
            assert getattr(trainer, f.name) == getattr(engine, f.name), f.name
    assert trainer.seed is None and trl.RollserveConfig(seed=5).seed == 5
    assert trl.RollserveConfig(kv_cache_memory="16MiB").kv_cache_memory == 16 << 20
    with pytest.raises(ValueError, match=r"RollserveConfig.max_num_seqs=0 is invalid: must be an int >= 1"):
        trl.RollserveConfig(max_num_seqs=0)
