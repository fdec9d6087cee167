"""`run_episodes`: multi-turn rollouts on the engine's step API, environments stepping in a thread pool.

The engine thread (the caller's) only adds requests, steps the engine and turns finished turns
into environment calls; `reset` and `step` run in a pool, so other episodes keep generating while
a tool runs. An episode's first turn is one request with `n` samples per distinct first prompt
(the prompt is prefilled once and its KV blocks shared); every later turn is its own request whose
prompt is the episode's token ids so far. With `keep_kv` each turn's sample is parked in the engine
(`add_request(park=True)`) while its environment runs and the next turn resumes it
(`LLM.resume`), so that turn computes only the environment's tokens and the previous turn's last
token; without, the prefix cache finds the earlier turns' full KV blocks and the turn also
recomputes the last, partial block.
"""

from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

from ..inputs import is_conversation
from ..sampling_params import SamplingParams
from .environment import as_messages, call, is_token_ids
from .episode import Episode
from .render import ChatSuffix


@dataclass
class _Run:
    """An episode in flight: its environment and what the next turn needs."""

    episode: Episode
    env: object
    history: str | None = None  # the text of the token ids so far (chat episodes)
    parked: tuple[str, int] | None = None  # (request id, sample index) of its last turn, parked in the engine
    template_kwargs: dict | None = None  # for the chat template: the call's, and the environment's `tools`


def _row(item, i: int) -> tuple[object, dict]:
    if isinstance(item, dict) and "prompt" in item:
        row = dict(item)
        return row.pop("prompt"), row
    if isinstance(item, dict):
        raise ValueError(f"prompts[{i}] is a dict without a 'prompt' key; a row is {{'prompt': ..., other fields}}")
    return item, {}


def _seed(params: SamplingParams, *parts: int) -> int | None:
    """A seed for one turn from the caller's, so a seeded run samples the same however turns interleave."""
    if params.seed is None:
        return None
    h = params.seed
    for p in parts:
        h = (h * 1_000_003 + p + 1) % (2**31)
    return h


def run_episodes(llm, prompts, env_factory, sampling_params: SamplingParams | None = None, *, max_turns: int = 4,
                 max_total_tokens: int | None = None, concurrency: int = 64,
                 chat_template_kwargs: dict | None = None, keep_kv: bool = True) -> list[Episode]:
    """Runs `sampling_params.n` episodes per prompt; returns them prompt by prompt, samples in order.

    `prompts`: prompts (a string is one user message; a conversation; token ids) or rows
    `{"prompt": ..., **fields}` whose fields go to `env.reset(prompt, **fields)`. `env_factory()`
    makes one `Environment` per episode (one with a `tools` attribute, a list of JSON schemas, has them
    rendered by the chat template as `tools=`). `sampling_params.max_tokens` bounds each model turn,
    `max_total_tokens` (default: the model's context) the whole episode; `max_turns` counts model
    turns. At most `concurrency` episodes are in flight. An environment that raises ends its
    episode with `finish_reason="error"`; the others go on. Requests of this call are aborted if it
    raises (e.g. `TemplatePrefixError`). `keep_kv=False` re-submits each turn's whole token ids
    instead of resuming the parked sample (the prefix cache still finds full blocks).
    `chat_template_kwargs` go to every rendering (e.g. `tools=[...]`).
    """
    by_prompt = {episodes[0].prompt_index: episodes for episodes in iter_episodes(
        llm, prompts, env_factory, sampling_params, max_turns=max_turns, max_total_tokens=max_total_tokens,
        concurrency=concurrency, chat_template_kwargs=chat_template_kwargs, keep_kv=keep_kv)}
    return [episode for p in sorted(by_prompt) for episode in by_prompt[p]]


def iter_episodes(llm, prompts, env_factory, sampling_params: SamplingParams | None = None, *,
                  prompt_indices=None, max_turns: int = 4, max_total_tokens: int | None = None,
                  concurrency: int = 64, chat_template_kwargs: dict | None = None,
                  keep_kv: bool = True) -> Iterator[list[Episode]]:
    """`run_episodes`, yielding each prompt's `n` episodes (samples in order) as soon as all of them have
    finished, prompts in the order they finish. `prompt_indices`: run only these rows of `prompts`
    (default all), numbered, and seeded, as in `prompts`, so a run over what an earlier one left undone
    samples what an uninterrupted run would have. The arguments are checked by this call; closing the
    iterator early aborts its requests and releases its parked KV.
    """
    params = SamplingParams() if sampling_params is None else sampling_params
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    for name, value in (("max_turns", max_turns), ("concurrency", concurrency)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be an int >= 1")
    limit = llm.max_model_len if max_total_tokens is None else min(max_total_tokens, llm.max_model_len)
    if not isinstance(limit, int) or limit < 2:
        raise ValueError(f"max_total_tokens={max_total_tokens!r} is invalid: must be an int >= 2")
    rows = [_row(item, i) for i, item in enumerate(prompts)]
    todo = range(len(rows)) if prompt_indices is None else list(prompt_indices)
    if bad := [p for p in todo if not (isinstance(p, int) and 0 <= p < len(rows))]:
        raise ValueError(f"prompt_indices {bad[:5]} are not indices of the {len(rows)} prompts")
    if len(set(todo)) < len(todo):
        raise ValueError("prompt_indices holds an index more than once")
    return _episodes(_Loop(llm, rows, todo, env_factory, params, max_turns, limit, concurrency, chat_template_kwargs,
                           keep_kv))


def _episodes(loop: "_Loop") -> Iterator[list[Episode]]:
    with ThreadPoolExecutor(max_workers=loop.concurrency, thread_name_prefix="rollserve-env") as pool:
        loop.pool = pool
        yield from loop.run()


class _Loop:
    def __init__(self, llm, rows, todo, env_factory, params, max_turns, limit, concurrency, chat_template_kwargs,
                 keep_kv):
        self.llm, self.rows, self.env_factory, self.params = llm, rows, env_factory, params
        self.keep_kv = keep_kv
        self.max_turns, self.limit, self.concurrency = max_turns, limit, concurrency
        self.pool: ThreadPoolExecutor | None = None  # set by `_episodes` for the loop's lifetime
        self.chat = ChatSuffix(llm.inputs, llm.get_tokenizer())
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.todo = deque(todo)
        self.in_engine: dict[str, list[_Run]] = {}  # request id -> the runs of its samples, by index
        self.in_env: dict = {}  # future -> (what it is: "reset" | "step", its run(s))
        self.num_active = 0
        self.runs: list[_Run] = []  # every episode started, to release what is parked if this call raises
        self.resets: dict[int, list[_Run]] = {}  # prompt index -> its episodes whose reset returned (or raised)
        self.done: dict[int, dict[int, Episode]] = {}  # prompt index -> its finished episodes, by sample index
        self.finished: list[list[Episode]] = []  # prompts whose every episode finished, not yet yielded

    def run(self) -> Iterator[list[Episode]]:
        try:
            while self.todo or self.in_engine or self.in_env:
                self._start()
                self._collect(block=not self.in_engine)
                if self.in_engine:
                    for out in self.llm.step():
                        if out.finished and out.request_id in self.in_engine:
                            self._turn_done(self.in_engine.pop(out.request_id), out.output)
                while self.finished:
                    yield self.finished.pop(0)
        except BaseException:  # GeneratorExit included: the caller stopped iterating
            for rid in self.in_engine:
                self.llm.abort(rid)
            for future in self.in_env:
                future.cancel()
            for run in self.runs:
                self._release(run)
            raise

    # -- episodes starting --------------------------------------------------
    def _start(self) -> None:
        n = self.params.n
        while self.todo and (self.num_active == 0 or self.num_active + n <= self.concurrency):
            p = self.todo.popleft()
            self.num_active += n
            prompt, row = self.rows[p]
            for s in range(n):
                env = self.env_factory()
                tools = getattr(env, "tools", None)
                run = _Run(Episode(p, s, 0), env, template_kwargs={**self.chat_template_kwargs,
                                                                   **({"tools": tools} if tools else {})})
                self.runs.append(run)
                self.in_env[self.pool.submit(call, env.reset, prompt, **row)] = ("reset", run)

    def _reset_done(self, run: _Run, observation) -> None:
        episode = run.episode
        prompt, _ = self.rows[episode.prompt_index]
        where = f"prompts[{episode.prompt_index}]"
        if is_token_ids(prompt):
            if observation is not None and not is_token_ids(observation):
                raise TypeError(f"{where}: reset() of an episode of token ids must return token ids or None, "
                                f"got {observation!r:.80}")
            ids = list(prompt) + list(observation or [])
        else:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if not is_conversation(messages):
                raise TypeError(f"{where} must be a string, a conversation or token ids, got {prompt!r:.80}")
            if observation is not None:
                messages += as_messages(observation, f"{where}: reset()'s observation")
            episode.messages = messages
            ids, run.history = self.chat.first(messages, where, run.template_kwargs)
        episode.num_prompt_tokens = len(ids)
        episode.append(ids, sampled=False)

    def _reset_returned(self, run: _Run) -> None:
        """Once every episode of a prompt is reset: one request with n samples per distinct first prompt (the
        same grouping every run, so seeded runs repeat)."""
        p = run.episode.prompt_index
        runs = self.resets.setdefault(p, [])
        runs.append(run)
        if len(runs) < self.params.n:
            return
        del self.resets[p]
        groups: dict[tuple, list[_Run]] = {}
        for run in sorted(runs, key=lambda r: r.episode.sample_index):
            if run.episode.finish_reason is None:
                groups.setdefault(tuple(run.episode.token_ids), []).append(run)
        for group in groups.values():
            first = group[0].episode
            params = self._turn_params(first, len(group), _seed(self.params, p, first.sample_index))
            if params is None:
                for run in group:
                    self._finish(run, "length")
            else:
                self._add(first.token_ids, params, group)

    # -- turns ----------------------------------------------------------------
    def _turn_params(self, episode: Episode, n: int, seed: int | None) -> SamplingParams | None:
        room = self.limit - len(episode.token_ids)
        if room < 1:
            return None
        logprobs = 0 if self.params.logprobs is None else self.params.logprobs
        return replace(self.params, n=n, max_tokens=min(self.params.max_tokens, room), seed=seed, logprobs=logprobs)

    def _add(self, token_ids: list[int], params: SamplingParams, runs: list[_Run]) -> None:
        self.in_engine[self.llm.add_request(list(token_ids), params, park=self.keep_kv)] = runs

    def _resume(self, run: _Run, env_ids: list[int], params: SamplingParams) -> None:
        if run.parked is None:
            return self._add(run.episode.token_ids, params, [run])
        (rid, index), run.parked = run.parked, None
        self.in_engine[self.llm.resume(rid, env_ids, params, index=index, park=True)] = [run]

    def _release(self, run: _Run) -> None:
        if run.parked is not None:
            self.llm.release(*run.parked)
            run.parked = None

    def _turn_done(self, runs: list[_Run], output) -> None:
        for run, c in zip(runs, output.outputs):
            episode = run.episode
            if self.keep_kv:
                run.parked = (output.request_id, c.index)
            episode.append(c.token_ids, True, c.logprobs, c.weight_versions)
            episode.num_turns += 1
            if episode.messages is not None:
                episode.messages.append({"role": "assistant", "content": c.text})
                run.history += self.chat.decode(c.token_ids)
            future = self.pool.submit(call, run.env.step, c.text, list(c.token_ids))
            self.in_env[future] = ("step", run)

    def _step_done(self, run: _Run, result) -> None:
        episode = run.episode
        where = f"prompts[{episode.prompt_index}] sample {episode.sample_index} turn {episode.num_turns}"
        if not (isinstance(result, tuple) and len(result) == 3):
            raise TypeError(f"{where}: step() must return (observation | None, reward, done), got {result!r:.80}")
        observation, reward, done = result
        episode.rewards.append(float(reward))
        if done:
            return self._finish(run, "done")
        if episode.num_turns >= self.max_turns:
            return self._finish(run, "max_turns")
        if observation is None:
            raise ValueError(f"{where}: step() returned no observation but done=False")
        if episode.messages is None:
            if not is_token_ids(observation):
                raise TypeError(f"{where}: an episode of token ids needs token-id observations, "
                                f"got {observation!r:.80}")
            ids = list(observation)
        else:
            episode.messages.extend(as_messages(observation, f"{where}: the observation"))
            ids, run.history = self.chat.extend(run.history, episode.messages, where, run.template_kwargs)
        if len(episode.token_ids) + len(ids) >= self.limit:
            return self._finish(run, "length")
        episode.append(ids, sampled=False)
        params = self._turn_params(episode, 1, _seed(self.params, episode.prompt_index, episode.sample_index,
                                                     episode.num_turns))
        self._resume(run, ids, params)

    def _finish(self, run: _Run, reason: str, error: str | None = None) -> None:
        self._release(run)
        run.episode.finish_reason, run.episode.error = reason, error
        episodes = self.done.setdefault(run.episode.prompt_index, {})
        episodes[run.episode.sample_index] = run.episode
        if len(episodes) == self.params.n:
            del self.done[run.episode.prompt_index]
            self.finished.append([episodes[s] for s in range(self.params.n)])
        self.num_active -= 1

    # -- environment results --------------------------------------------------
    def _collect(self, block: bool) -> None:
        if not self.in_env:
            return
        ready, _ = wait(list(self.in_env), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in ready:
            kind, run = self.in_env.pop(future)
            error = future.exception()
            if error is not None:
                if kind == "step":
                    run.episode.rewards.append(0.0)
                self._finish(run, "error", f"{kind}() raised {type(error).__name__}: {error}")
            elif kind == "reset":
                self._reset_done(run, future.result())
            else:
                self._step_done(run, future.result())
            if kind == "reset":
                self._reset_returned(run)
