"""Training metrics: ``metrics.jsonl`` (one line per optimizer step), the experiment trackers
of ``report_to`` (TensorBoard, Weights & Biases, MLflow), plain log lines when the progress
bar is off, and the progress bar.

Only the main rank writes. Values arrive as Python numbers: the trainer moves the step's
device scalars to the host once per step.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch
from tqdm.auto import tqdm

from drift_engine.errors import ConfigError
from drift_engine.files import atomic_path

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# report_to name -> the package it needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# seconds between plain log lines when the progress bar is off (first and last step always)
LOG_INTERVAL_S = 30.0


def check_report_to(names: Sequence[str]) -> list[str]:
    """The trackers named in ``report_to`` ("none" for none), each checked to be known and
    installed; raises ConfigError otherwise."""
    chosen = [n for n in dict.fromkeys(names) if n != "none"]
    for name in chosen:
        if name not in TRACKERS:
            known = ", ".join([*TRACKERS, "none"])
            raise ConfigError(f"report_to: unknown tracker {name!r} (known: {known})")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(
                f"report_to {name!r} needs the {TRACKERS[name]} package: pip install "
                f"{TRACKERS[name]} (or leave {name} out of --report-to)"
            )
    return chosen


def weight_stats(weights: torch.Tensor, step_batches: Sequence[Sequence[int]]) -> dict[str, float]:
    """Importance-weight statistics of one optimizer step's trajectories: mean, min, max and
    the effective sample size ``ESS = (Σw)² / Σw²`` (``weight_ess``; ``weight_ess_fraction`` =
    ESS / trajectories: 1 when all weights are equal, 1/n when one trajectory carries the
    step). ``weights`` (S,) holds every rollout row's weight; ``step_batches`` the step's rows."""
    rows = [i for batch in step_batches for i in batch]
    if not rows:
        return {}
    w = weights[torch.as_tensor(rows, dtype=torch.long)].to(torch.float64)  # (n,)
    total, squares = float(w.sum()), float((w * w).sum())
    ess = total * total / squares if squares > 0 else 0.0
    return {
        "weight_mean": total / len(rows),
        "weight_min": float(w.min()),
        "weight_max": float(w.max()),
        "weight_ess": ess,
        "weight_ess_fraction": ess / len(rows),
    }


class MetricsWriter:
    """Appends one JSON object per optimizer step to ``out/metrics.jsonl``, and sends the
    same numbers to the trackers of ``report_to`` and, with ``log_lines``, to ``stream`` as a
    plain line (every ``log_interval_s`` seconds, and at the first and ``total_steps``-th step).

    On resume from step ``resume_step``, lines of steps after it (written by the
    interrupted run, which will be recomputed) are dropped first, so the file holds each
    step exactly once; TensorBoard drops its events after that step too.
    """

    def __init__(
        self,
        out_dir: str | Path,
        resume_step: int = 0,
        enabled: bool = True,
        *,
        report_to: Sequence[str] = (),
        run_config: dict[str, Any] | None = None,
        log_lines: bool = False,
        total_steps: int | None = None,
        log_interval_s: float = LOG_INTERVAL_S,
        stream: IO[str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._trackers: list[_Tracker] = []
        self._lines = (
            _LogLines(total_steps, log_interval_s, stream or sys.stderr)
            if enabled and log_lines
            else None
        )
        if not enabled:
            return
        if self.path.exists():
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        for name in check_report_to(report_to):
            self._trackers.append(_TRACKER_TYPES[name](self.out_dir, resume_step, run_config or {}))

    def _truncate_after(self, step: int) -> None:
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a killed run
                if record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._trackers:
            step = int(record["step"])
            scalars = {
                k: float(v)
                for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            for tracker in self._trackers:
                tracker.log(scalars, step)
        if self._lines is not None:
            self._lines.write(record)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Throughput:
    """Tokens per second of each step, timed from the end of the previous one."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def restart(self) -> None:
        """Time the next step from now (after work that is not training, e.g. evaluation)."""
        self._last = time.perf_counter()

    def step(self, tokens: int) -> tuple[float, float]:
        """Record a finished step of ``tokens`` tokens; return (step tokens/s, seconds)."""
        now = time.perf_counter()
        seconds = max(now - self._last, 1e-9)
        self._last = now
        return tokens / seconds, seconds


class ProgressBar:
    """tqdm over optimizer steps showing loss, tokens/s and (tqdm's) ETA."""

    def __init__(self, total_steps: int, initial_step: int, enabled: bool):
        self._bar = (
            tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)
            if enabled
            else None
        )

    def update(self, loss: float, tokens_per_s: float, lr: float) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix(
            loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}", refresh=False
        )
        self._bar.update(1)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class TrainingEvaluation:
    """multi@k of the model being trained on held-out problems (``TrainConfig.eval``): greedy
    multi-turn episodes, as ``drift-engine eval`` runs them, every ``every_steps`` optimizer
    steps and after the last one. Every rank runs it (the same greedy episodes, so sharded
    models stay in step); the metrics are ``eval_multi_at_1`` … ``eval_multi_at_K``."""

    def __init__(self, section: Any, tokenizer: Any, compute_dtype: torch.dtype):
        from drift_engine.envs import load_environment, load_problems

        if tokenizer is None:
            raise ConfigError(
                "eval.problems is set but the model folder has no tokenizer; evaluation needs "
                "the tokenizer and its chat template"
            )
        self.section = section
        self.tokenizer = tokenizer
        self.compute_dtype = compute_dtype
        self.env = load_environment(section.env)
        self.problems = load_problems(section.problems, env=self.env, limit=section.limit)

    @classmethod
    def create(
        cls, section: Any, tokenizer: Any, compute_dtype: torch.dtype
    ) -> TrainingEvaluation | None:
        """The evaluation of ``section`` (a TrainConfig.eval), or None when it is off."""
        return cls(section, tokenizer, compute_dtype) if section.problems else None

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.section.every_steps == 0 or step == total_steps

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """Evaluate ``model`` (left in training mode after); returns the metrics."""
        from drift_engine.evaluate import evaluate_multi_at_k
        from drift_engine.rollout.hf import HFEngine

        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        device = next(model.parameters()).device
        try:
            with torch.autocast(
                device.type,
                dtype=self.compute_dtype,
                enabled=self.compute_dtype != torch.float32,
            ):
                result = evaluate_multi_at_k(
                    HFEngine(model, pad_token_id=pad or 0),
                    self.tokenizer,
                    self.env,
                    self.problems,
                    self.section.max_turns,
                    max_new_tokens=self.section.max_new_tokens,
                )
        finally:
            model.train()
        return {f"eval_multi_at_{k}": result.at(k) for k in range(1, result.max_turns + 1)}


class _LogLines:
    """``step 12/100 | loss 1.2345 | lr 5.00e-06 | grad_norm 0.81 | tok/s 43,210 | ess 0.71 |
    eta 0:03:12``: one line per interval when there is no progress bar (logs, batch jobs)."""

    def __init__(self, total_steps: int | None, interval_s: float, stream: IO[str]):
        self.total_steps = total_steps
        self.interval_s = interval_s
        self.stream = stream
        self._start = time.perf_counter()
        self._last: float | None = None
        self._first_step: int | None = None

    def write(self, record: dict[str, Any]) -> None:
        step, now = int(record["step"]), time.perf_counter()
        if self._first_step is None:
            self._first_step = step
        last = self.total_steps is not None and step >= self.total_steps
        if self._last is not None and not last and now - self._last < self.interval_s:
            return
        self._last = now
        parts = [f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
        for key, label, fmt in (
            ("loss", "loss", "{:.4f}"),
            ("lr", "lr", "{:.2e}"),
            ("grad_norm", "grad_norm", "{:.3g}"),
            ("tokens_per_s", "tok/s", "{:,.0f}"),
            ("weight_ess_fraction", "ess", "{:.2f}"),
        ):
            if isinstance(record.get(key), (int, float)):
                parts.append(f"{label} {fmt.format(record[key])}")
        done = step - self._first_step + 1
        if self.total_steps and not last:
            remaining = (now - self._start) / done * (self.total_steps - step)
            parts.append(f"eta {_clock(remaining)}")
        self.stream.write(" | ".join(parts) + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class _Tracker:
    def log(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _TensorBoard(_Tracker):
    """Scalars ``train/<name>`` in ``out/tensorboard`` (``tensorboard --logdir OUT``)."""

    def __init__(self, out_dir: Path, resume_step: int, run_config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops the events an interrupted run wrote after the checkpoint.
        self.writer = SummaryWriter(
            str(out_dir / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step else None
        )
        if not resume_step:
            self.writer.add_text("config", "```\n" + json.dumps(run_config, indent=2) + "\n```")

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB(_Tracker):
    """A Weights & Biases run (project ``$WANDB_PROJECT``, default "drift-engine"); resuming
    the training run resumes the same wandb run (its id is kept in ``out/wandb_run_id``)."""

    def __init__(self, out_dir: Path, resume_step: int, run_config: dict[str, Any]):
        import wandb

        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "drift-engine"),
            name=out_dir.name,
            dir=str(out_dir),
            config=run_config,
            id=run_id,
            resume="allow",
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow(_Tracker):
    """An MLflow run (experiment ``$MLFLOW_EXPERIMENT_NAME``, default "drift-engine"; tracking
    server ``$MLFLOW_TRACKING_URI``, default ./mlruns)."""

    def __init__(self, out_dir: Path, resume_step: int, run_config: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "drift-engine"))
        self.run = mlflow.start_run(run_name=out_dir.name)
        mlflow.log_params(_flatten(run_config))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_TRACKER_TYPES: dict[str, type[_Tracker]] = {
    "tensorboard": _TensorBoard,
    "wandb": _WandB,
    "mlflow": _MLflow,
}
