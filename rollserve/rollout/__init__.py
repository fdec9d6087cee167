"""Rollout API, dataset generation and server (built on `rollserve.LLM`)."""

from .dataset import DatasetSummary, RewardError, generate_dataset, prompt_seed
from .inputs import PromptFileError, PromptRow, PromptSet, read_prompts
from .shards import OutputDirError

__all__ = ["generate_dataset", "DatasetSummary", "RewardError", "prompt_seed", "read_prompts", "PromptSet",
           "PromptRow", "PromptFileError", "OutputDirError"]
