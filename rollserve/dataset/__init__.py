"""`rollserve generate`: many samples of a prompt set into resumable shards, with optional rewards."""

from .generate import DatasetSummary, RewardError, generate_dataset, prompt_seed
from .prompts import PromptFileError, PromptRow, PromptSet, read_prompts
from .shards import OutputDirError

__all__ = ["generate_dataset", "DatasetSummary", "RewardError", "prompt_seed", "read_prompts", "PromptSet",
           "PromptRow", "PromptFileError", "OutputDirError"]
