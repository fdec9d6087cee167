"""Sampling parameters for `LLM.generate`."""

from dataclasses import dataclass, field

LOGPROBS_MODES = ("policy", "sampling", "raw")


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: must be {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to sample completions for one prompt.

    `temperature=0` is greedy decoding. `logprobs` is `None` (no logprobs) or the
    number of top alternatives to report besides the sampled token (0 = sampled
    token only). Reported logprobs are `log_softmax(logits / temperature)` over
    the full vocabulary (temperature 1 when greedy) - what an RL trainer
    recomputes.
    """

    n: int = 1
    temperature: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "an int >= 1")
        _check(
            isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
            and self.temperature >= 0 and self.temperature == self.temperature,
            "temperature", self.temperature, "a float >= 0 (0 = greedy)",
        )
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an int >= 1")
        _check(
            isinstance(self.stop_token_ids, (list, tuple)) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids", self.stop_token_ids, "a list of non-negative token ids",
        )
        self.stop_token_ids = list(self.stop_token_ids)
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "a bool")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "None or an int")
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
            "logprobs", self.logprobs, "None or an int >= 0",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
