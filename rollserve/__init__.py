"""rollserve: the rollout engine for RL post-training of language models."""

__version__ = "0.1.0"  # first: submodules imported below read it

from .config import EngineConfig
from .llm import LLM
from .model_loader import gguf_to_hf, smollm2_135m_instruct
from .outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, RequestOutput
from .rollout.client import RemoteLLM
from .sampling_params import BeamSearchParams, SamplingParams


__all__ = ["LLM", "RemoteLLM", "SamplingParams", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence",
           "EngineConfig", "RequestOutput", "CompletionOutput", "gguf_to_hf", "smollm2_135m_instruct", "__version__"]
