"""rollserve: the rollout engine for RL post-training of language models.

`import rollserve` stays light: the server client and the dataset generator are imported when first used.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rollserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from .config import EngineConfig
from .llm import LLM
from .model_loader import gguf_to_hf, smollm2_135m_instruct
from .outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, RequestOutput
from .sampling_params import BeamSearchParams, SamplingParams

_LAZY = {"RemoteLLM": "rollserve.serve.client", "generate_dataset": "rollserve.dataset"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rollserve' has no attribute {name!r}")


__all__ = ["LLM", "RemoteLLM", "SamplingParams", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence",
           "EngineConfig", "RequestOutput", "CompletionOutput", "gguf_to_hf", "smollm2_135m_instruct",
           "generate_dataset", "__version__"]
