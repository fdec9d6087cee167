"""The attention backend choice (`kernels.backend`) and the `attention_backend` engine argument."""

import os
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO
from rollserve.config import EngineConfig
from rollserve.kernels import backend
from rollserve.kernels.backend import choose_attention_backend


@pytest.fixture
def triton_present(monkeypatch):
    monkeypatch.setattr(backend, "triton_installed", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_auto_takes_the_cpu_extension_or_torch_on_the_cpu_and_triton_on_cuda(triton_present, monkeypatch):
    from rollserve.kernels import cpu_ext

    assert choose_attention_backend("auto", "cpu", 16) == ("cpu" if cpu_ext.extension() is not None else "torch")
    monkeypatch.setattr(cpu_ext, "extension", lambda: None)
    assert choose_attention_backend("auto", "cpu", 16) == "torch"
    assert choose_attention_backend("auto", "cuda:0", 16) == "triton"
    assert choose_attention_backend("auto", "cuda", 32) == "triton"


def test_auto_takes_torch_on_cuda_without_triton_or_with_a_block_size_the_kernels_cannot_tile(monkeypatch):
    monkeypatch.setattr(backend, "triton_installed", lambda: False)
    assert choose_attention_backend("auto", "cuda", 16) == "torch"
    monkeypatch.setattr(backend, "triton_installed", lambda: True)
    assert choose_attention_backend("auto", "cuda", 8) == "torch"
    assert choose_attention_backend("auto", "cuda", 24) == "torch"


def test_a_forced_backend_is_kept_or_refused_with_the_reason(triton_present, monkeypatch):
    assert choose_attention_backend("torch", "cuda", 16) == "torch"
    assert choose_attention_backend("triton", "cuda", 16) == "triton"
    with pytest.raises(ValueError, match="needs the model on a CUDA device.*TRITON_INTERPRET=1"):
        choose_attention_backend("triton", "cpu", 16)
    with pytest.raises(ValueError, match="block_size to be a power of two >= 16, got 8"):
        choose_attention_backend("triton", "cuda", 8)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_attention_backend("triton", "cpu", 16) == "triton"
    monkeypatch.setattr(backend, "triton_installed", lambda: False)
    with pytest.raises(ValueError, match=r"pip install 'rollserve\[triton\]'"):
        choose_attention_backend("triton", "cuda", 16)


def test_engine_config_checks_the_field():
    assert EngineConfig().attention_backend == "auto"
    with pytest.raises(ValueError, match="EngineConfig.attention_backend='cuda' is invalid: must be one of "
                                         "'auto', 'torch', 'triton'"):
        EngineConfig(attention_backend="cuda")


def test_an_engine_on_the_cpu_imports_no_triton_kernel():
    """`auto` on the CPU runs the torch references and never imports the Triton modules."""
    code = textwrap.dedent("""
        import sys
        from conftest import build_tiny_model
        from rollserve import LLM, SamplingParams
        llm = LLM(build_tiny_model("llama"), kv_cache_memory="1MiB")
        llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
        loaded = sorted(m for m in sys.modules if m.startswith("rollserve.kernels.triton"))
        assert not loaded, loaded
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_cpu_extension_is_built_and_loaded_per_cpu(monkeypatch):
    """The extension is compiled with -march=native: a build from a CPU with other instruction sets (a shared
    home directory) lives in another folder, so it is never loaded here."""
    import torch

    from rollserve.kernels import cpu_ext

    here = cpu_ext.build_dir()
    assert here == cpu_ext.build_dir() and here.name.startswith(f"torch-{torch.__version__}-native-")
    monkeypatch.setattr(cpu_ext, "_cpu_flags", lambda: "avx avx2 avx512f fma")
    avx512 = cpu_ext.build_dir()
    monkeypatch.setattr(cpu_ext, "_cpu_flags", lambda: "avx avx2 fma")
    assert len({here, avx512, cpu_ext.build_dir()}) == 3
