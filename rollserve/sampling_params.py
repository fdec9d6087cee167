"""Sampling parameters for `LLM.generate` and `LLM.beam_search`."""

import math
from dataclasses import dataclass, field

LOGPROBS_MODES = ("policy", "sampling", "raw")


def _check(ok: bool, name: str, value, allowed: str, owner: str = "SamplingParams") -> None:
    if not ok:
        raise ValueError(f"{owner}.{name}={value!r} is invalid: must be {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _token_id_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_int(t) and t >= 0 for t in value)


@dataclass
class SamplingParams:
    """How to sample completions for one prompt (the fields of vLLM's `SamplingParams`).

    Order of operations on a row of logits: penalties (repetition on prompt and
    output tokens, presence/frequency on output tokens) and `min_tokens`
    masking -> temperature -> top_k -> top_p (over the top_k renormalised
    distribution) -> min_p (relative to the most likely token) -> sample.
    `temperature=0` is greedy (argmax after penalties); `n > 1` is allowed with
    it and returns n identical completions.

    Logprobs (`logprobs=None` reports none; `k >= 0` reports the sampled token's
    logprob plus the top k alternatives) follow `logprobs_mode`:

    - "policy" (default): `log_softmax(logits / temperature)` over the full
      vocabulary, before penalties and filters (temperature 1 when greedy) -
      exactly what an RL trainer recomputes;
    - "sampling": the distribution actually sampled from (after penalties,
      masks and filters, renormalised);
    - "raw": `log_softmax(logits)`.

    `prompt_logprobs=k` reports each prompt token's logprob (the first is
    None) plus the top k alternatives, under `log_softmax(logits / T)` for the
    "policy" and "sampling" modes and `log_softmax(logits)` for "raw".
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprobs_mode: str = "policy"

    def __post_init__(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "an int >= 1")
        _check(_is_real(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "a finite float >= 0 (0 = greedy)")
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a float in (0, 1]")
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k", self.top_k, "an int >= 1, or 0 / -1 for off")
        if self.top_k == -1:
            self.top_k = 0
        _check(_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "a float in [0, 1]")
        _check(_is_real(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               self.repetition_penalty, "a finite float > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_real(value) and -2 <= value <= 2, name, value, "a float in [-2, 2] (0 = off)")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "None or an int")
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an int >= 1")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
               f"an int in [0, max_tokens={self.max_tokens}]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        _check(isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop),
               "stop", self.stop, "None, a non-empty string or a list of non-empty strings")
        self.stop = list(self.stop)
        _check(_token_id_list(self.stop_token_ids), "stop_token_ids", self.stop_token_ids,
               "a list of non-negative int token ids")
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "a bool")
        _check(self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
               "logprobs", self.logprobs, "None or an int >= 0 (the number of top alternatives)")
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and self.prompt_logprobs >= 0),
               "prompt_logprobs", self.prompt_logprobs, "None or an int >= 0 (the number of top alternatives)")
        _check(self.logprobs_mode in LOGPROBS_MODES, "logprobs_mode", self.logprobs_mode,
               f"one of {', '.join(map(repr, LOGPROBS_MODES))}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def has_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0


@dataclass
class BeamSearchParams:
    """Beam search: keep the `beam_width` best partial sequences by cumulative logprob.

    Candidates are scored with `log_softmax(logits)`. A beam ends at EOS (unless
    `ignore_eos`), a token in `stop_token_ids`, or `max_tokens`; the search of a
    prompt stops once `beam_width` beams have ended or every live beam reached
    `max_tokens`. Final ranking: cumulative logprob / completion_length ** length_penalty.
    """

    beam_width: int
    max_tokens: int = 16
    length_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = "BeamSearchParams"
        _check(_is_int(self.beam_width) and self.beam_width >= 1, "beam_width", self.beam_width, "an int >= 1", owner)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an int >= 1", owner)
        _check(_is_real(self.length_penalty), "length_penalty", self.length_penalty, "a finite float", owner)
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "a bool", owner)
        _check(_token_id_list(self.stop_token_ids), "stop_token_ids", self.stop_token_ids,
               "a list of non-negative int token ids", owner)
        self.stop_token_ids = list(self.stop_token_ids)
