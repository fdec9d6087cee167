"""The `rollserve` command. Each subcommand is a function that adds its parser and one that runs it.

    rollserve generate --model PATH --prompts FILE --out DIR [--n 8 --temperature 1.0 --max-tokens 256 ...]
    rollserve generate ... --env my_envs:make_env --max-turns 4     (multi-turn episodes, one row each)
    rollserve serve --model PATH [--http-port 8000 --kv-cache-memory 2GiB ...]

Parsing imports neither torch nor transformers (`--help` and argument errors are quick); a command
imports the engine when it runs.
"""

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from . import __version__
from .config import add_engine_arguments, dtype_name, engine_args_from
from .sampling_params import SamplingParams

_DEFAULTS = SamplingParams()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: ...)` to an option's help, except where there is no default worth showing.

    Not for required options, flags (bool defaults), None, or help that already names its default.
    """

    def _get_help_string(self, action):
        default = action.default
        if action.required or default is None or isinstance(default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def load_callable(spec: str, flag: str = "--reward", metavar: str = "MODULE:FUNC",
                  example: str = "my_rewards:exact_match"):
    """`"package.module:func"` or `"path/to/file.py:func"` -> the function (the current folder is importable).
    Errors name `flag`, the option the spec came from."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{flag} {spec!r}: expected {metavar} (e.g. {example})")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail in any way while importing
        raise ValueError(f"{flag} {spec!r}: cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"{flag} {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"{flag} {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def load_env_factory(spec: str):
    """`--env MODULE:FACTORY` -> the factory, after making one environment with it (before the model loads, so a
    factory that fails or makes something without `reset` and `step` is told at once)."""
    factory = load_callable(spec, "--env", "MODULE:FACTORY", "my_envs:GuessTheNumber")
    try:
        env = factory()
    except Exception as e:  # the user's factory may fail in any way
        raise ValueError(f"--env {spec!r}: calling it raised {type(e).__name__}: {e}") from None
    if missing := [m for m in ("reset", "step") if not callable(getattr(env, m, None))]:
        raise ValueError(f"--env {spec!r}: it made a {type(env).__name__} object, which has no "
                         f"{' and no '.join(missing)} method; an environment has reset(prompt, **row) and "
                         f"step(text, ids)")
    return factory


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample completions of a prompt set into a resumable dataset",
                              description="Samples N completions of every prompt and writes them as shards, one "
                                          "row per completion (rerun the same command to resume after an "
                                          "interruption). Shards hold prompts in the order they finish: sort by "
                                          "prompt_index, sample_index for prompt order.",
                              formatter_class=HelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--model", required=True, help="HF model folder or .gguf file")
    io.add_argument("--prompts", required=True, help=".jsonl, .parquet, or a datasets.save_to_disk folder")
    io.add_argument("--prompt-field", default="prompt", help="column holding the prompt")
    io.add_argument("--chat", action="store_true", help="apply the chat template to string prompts too "
                                                         "(message-list rows always get it)")
    io.add_argument("--out", required=True, help="output folder")
    io.add_argument("--format", default="parquet", choices=("parquet", "jsonl"), help="shard file format")
    io.add_argument("--batch-size", type=int, default=64, help="prompts per shard")
    io.add_argument("--overwrite", action="store_true", help="replace a dataset written with other parameters")
    io.add_argument("--reward", metavar="MODULE:FUNC",
                    help="reward(prompt, completion, **row) -> float, in a 'reward' column (only with --reward); "
                         "MODULE may be a .py path")
    io.add_argument("--env", metavar="MODULE:FACTORY",
                    help="run multi-turn episodes instead of single completions: FACTORY() makes one environment "
                         "(reset(prompt, **row), step(text, ids) -> (observation, reward, done); see "
                         "rollserve.agents) per episode, and each (prompt, sample) episode is one row (token_ids, "
                         "mask, logprobs, rewards, messages, ...); prompts always get the chat template; MODULE may "
                         "be a .py path; not with --reward")
    io.add_argument("--max-turns", type=int, default=4, help="with --env: most model turns per episode")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = p.add_argument_group("sampling (see rollserve.SamplingParams)",
                             "--seed S (an engine option below) also seeds every prompt: prompt i is sampled "
                             "with prompt_seed(S, i) (with --env each turn is seeded from S, the prompt, sample "
                             "and turn), so a resumed run reproduces an uninterrupted one")
    s.add_argument("--n", type=int, default=_DEFAULTS.n, help="completions per prompt")
    s.add_argument("--temperature", type=float, default=_DEFAULTS.temperature, help="0: greedy")
    s.add_argument("--top-p", type=float, default=_DEFAULTS.top_p, help="nucleus sampling mass (1: off)")
    s.add_argument("--top-k", type=int, default=_DEFAULTS.top_k, help="most likely tokens kept (0: all)")
    s.add_argument("--min-p", type=float, default=_DEFAULTS.min_p,
                   help="least probability kept, relative to the most likely token (0: off)")
    s.add_argument("--repetition-penalty", type=float, default=_DEFAULTS.repetition_penalty, help="1: off")
    s.add_argument("--presence-penalty", type=float, default=_DEFAULTS.presence_penalty, help="0: off")
    s.add_argument("--frequency-penalty", type=float, default=_DEFAULTS.frequency_penalty, help="0: off")
    s.add_argument("--max-tokens", type=int, default=_DEFAULTS.max_tokens, help="most tokens per completion")
    s.add_argument("--min-tokens", type=int, default=_DEFAULTS.min_tokens, help="no stop before this many tokens")
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="go on after the end-of-sequence token")
    s.add_argument("--logprobs", type=int, default=None, help="0: store each sampled token's logprob")
    add_engine_arguments(p.add_argument_group("engine (see rollserve.EngineConfig)"))
    _add_replica_arguments(p)
    p.set_defaults(run=_run_generate)


def _add_replica_arguments(p) -> None:
    r = p.add_argument_group("scale-out on Ray (see rollserve.cluster.RolloutCluster, docs/cluster.md)",
                             "with --replicas the prompts are spread over engine replicas, each a Ray actor with "
                             "the engine options above; same rows, shards and resume as one engine (a dataset "
                             "may be resumed with another --replicas or without)")
    r.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="engine replicas on Ray: joins the cluster of `ray start` (or RAY_ADDRESS), else "
                        "starts a local one (default: one engine in this process, no Ray)")
    r.add_argument("--replica-cpus", type=int, default=1, metavar="N", help="CPUs per replica (its torch threads)")
    r.add_argument("--replica-gpus", type=float, default=0, metavar="N", help="GPUs per replica")


def _engine(args):
    """One `LLM` in this process, or with `--replicas` a `RolloutCluster` of that many."""
    engine_args = dataclasses.asdict(engine_args_from(args))
    if args.replicas is None:
        from . import LLM

        return LLM(args.model, **engine_args)
    from .cluster import RolloutCluster  # ImportError naming the extra when Ray is not installed

    resources = {"num_cpus": args.replica_cpus, **({"num_gpus": args.replica_gpus} if args.replica_gpus else {})}
    return RolloutCluster(args.model, args.replicas, resources, **engine_args)


def _sampling_params(args) -> SamplingParams:
    return SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
        stop=args.stop, ignore_eos=args.ignore_eos, logprobs=args.logprobs, seed=args.seed)  # the engine's --seed


def _run_generate(args) -> int:
    try:
        params = _sampling_params(args)  # before the engine is imported: a bad value fails at once
        if args.max_turns < 1:
            raise ValueError(f"--max-turns {args.max_turns} is invalid: must be >= 1")
    except (ValueError, TypeError) as e:
        return _fail(args, f"error: {e}", 2)
    from .dataset import RewardError, generate_dataset, read_prompts

    try:
        if args.env and args.reward:
            raise ValueError("--reward cannot be combined with --env: an episode's rewards are its environment's")
        if args.env and args.replicas is not None:
            raise ValueError("--replicas cannot be combined with --env: episodes keep their KV on one engine "
                             "between turns, and the cluster does not run them")
        reward_fn = load_callable(args.reward) if args.reward else None
        env_factory = load_env_factory(args.env) if args.env else None
        prompts = read_prompts(args.prompts, args.prompt_field)
        if (done := _already_complete(args, prompts, params)) is not None:
            print(f"{args.out}: already complete with these parameters ({done.num_rows} rows, "
                  f"{len(done.prompt_indices)} prompts); nothing to do, the model was not loaded "
                  f"(--overwrite generates it again)")
            return 0
        llm = _engine(args)
    except (ValueError, TypeError, OSError, ImportError) as e:
        return _fail(args, f"error: {e}", 2)
    try:
        summary = generate_dataset(
            llm, prompts, params, args.out, reward_fn, batch_size=args.batch_size, chat=args.chat,
            prompt_field=args.prompt_field, output_format=args.format, overwrite=args.overwrite,
            use_tqdm=not args.no_progress, model_name=args.model, reward_name=args.reward, env_factory=env_factory,
            max_turns=args.max_turns, env_name=args.env)
    except RewardError as e:
        return _fail(args, f"stopped: {e}\nshards written so far are kept in {args.out}; rerun to resume", 1)
    except (ValueError, TypeError, OSError) as e:
        return _fail(args, f"error: {e}", 2)
    except KeyboardInterrupt:
        return _fail(args, f"interrupted; finished prompts are kept in {args.out}; rerun the same command to resume", 130)
    finally:
        if args.replicas is not None:
            llm.shutdown()
    print(summary)
    if args.replicas is not None:
        import ray

        print(f"  engines: {args.replicas} replicas on the Ray cluster at {ray.get_runtime_context().gcs_address}")
    return 0


def _already_complete(args, prompts, params: SamplingParams):
    """Refuses an `--out` generated with other parameters; its stats if it is complete already, else None.

    Before the model loads, so it compares what is known then (the weights' dtype only when `--dtype`
    names one); `generate_dataset` checks everything again.
    """
    from .dataset.shards import ShardStore, dataset_config

    if args.overwrite:
        return None
    config = dataset_config(prompts, dataclasses.asdict(params), args.chat, args.prompt_field, args.format,
                            args.reward, args.model, dtype_name(args.dtype), args.env, args.max_turns)
    store = ShardStore(args.out, args.format, args.reward is not None, episodes=args.env is not None)
    return store.finished(config, params.n)


def _fail(args, message: str, code: int) -> int:
    print(f"rollserve {args.command}: {message}", file=sys.stderr)
    return code


def _add_serve(subparsers) -> None:
    from .serve import options

    p = subparsers.add_parser("serve", help="run an engine in its own process: ZMQ (RemoteLLM) and OpenAI HTTP fronts",
                              description="Serve a model until SIGTERM/SIGINT; prints one 'ROLLSERVE READY {json}' line.",
                              formatter_class=HelpFormatter)
    options.add_arguments(p)
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    from .serve import server

    return server.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollserve", description="rollserve: the rollout engine for RL post-training")
    parser.add_argument("--version", action="version", version=f"rollserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(subparsers)
    _add_serve(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
