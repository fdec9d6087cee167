"""The rows of `rollserve generate --env`: one per (prompt, sample) multi-turn episode, from `iter_episodes`.

The episodes of a prompt come back together once all of them have finished, so a shard holds every
sample of its prompts, as with completions, and resume is decided per prompt. A seeded run seeds
every turn from (seed, prompt index, sample index, turn) (`rollserve.agents`), so a resumed run
samples what an uninterrupted one would have.
"""

import json
from collections.abc import Iterator
from contextlib import closing

from ..agents import Episode, iter_episodes
from .prompts import PromptFileError, PromptRow


class EpisodeRows:
    """Episodes of `env_factory()` environments, at most `concurrency` in flight, and their shard columns."""

    def __init__(self, llm, rows: list[PromptRow], texts: list[str], env_factory, params, max_turns: int,
                 concurrency: int):
        for row in rows:
            if "prompt" in row.extra:
                raise PromptFileError(f"{row.where}: field 'prompt' would clash with the environment's reset(prompt, "
                                      f"**row) argument of that name; rename it")
        self.llm, self.rows, self.texts, self.env_factory = llm, rows, texts, env_factory
        self.params, self.max_turns, self.concurrency = params, max_turns, concurrency

    def results(self, todo: list[int]) -> Iterator[tuple[int, list[Episode]]]:
        prompts = [{"prompt": row.prompt, **row.extra} for row in self.rows]
        episodes = iter_episodes(self.llm, prompts, self.env_factory, self.params, prompt_indices=todo,
                                 max_turns=self.max_turns, concurrency=self.concurrency)
        with closing(episodes):  # a consumer that stops early aborts what is in flight
            for group in episodes:
                yield group[0].prompt_index, group

    @staticmethod
    def size(episodes: list[Episode]) -> tuple[int, int]:
        """(rows, tokens the model sampled)."""
        return len(episodes), sum(sum(e.mask) for e in episodes)

    def columns(self, batch: list[tuple[int, list[Episode]]], names: list[str]) -> dict[str, list]:
        columns = {name: [] for name in names}
        for i, episodes in batch:
            for e in episodes:
                values = {"prompt_index": i, "prompt": self.texts[i], "sample_index": e.sample_index,
                          "token_ids": e.token_ids, "mask": e.mask, "logprobs": e.logprobs,
                          "weight_versions": e.weight_versions, "num_prompt_tokens": e.num_prompt_tokens,
                          "rewards": e.rewards, "reward": e.reward, "num_turns": e.num_turns,
                          "finish_reason": e.finish_reason, "error": e.error,
                          # JSON: an environment's messages may carry any keys (tool names, tool calls)
                          "messages": json.dumps(e.messages, ensure_ascii=False, default=str)}
                for name in names:
                    columns[name].append(values[name])
        return columns
