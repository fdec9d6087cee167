"""rollserve: the rollout engine for RL post-training of language models.

`import rollserve` stays light (no torch, no transformers, so `rollserve --help` is quick): the engine, the
model loader, the server client and the dataset generator are imported when first used.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rollserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from .config import EngineConfig
from .outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, RequestOutput
from .sampling_params import BeamSearchParams, SamplingParams

_LAZY = {
    "LLM": "rollserve.llm", "gguf_to_hf": "rollserve.model_loader", "smollm2_135m_instruct": "rollserve.model_loader",
    "RemoteLLM": "rollserve.serve.client", "generate_dataset": "rollserve.dataset",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rollserve' has no attribute {name!r}")


__all__ = ["LLM", "RemoteLLM", "SamplingParams", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence",
           "EngineConfig", "RequestOutput", "CompletionOutput", "gguf_to_hf", "smollm2_135m_instruct",
           "generate_dataset", "__version__"]
