"""Training metrics: ``metrics.jsonl`` (one line per optimizer step) and the progress bar.

Only the main rank writes. Values arrive as Python numbers: the trainer moves the step's
device scalars to the host once per step.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON object per optimizer step to ``out/metrics.jsonl``.

    On resume from step ``resume_step``, lines of steps after it (written by the
    interrupted run, which will be recomputed) are dropped first, so the file holds each
    step exactly once.
    """

    def __init__(self, out_dir: str | Path, resume_step: int = 0, enabled: bool = True):
        self.path = Path(out_dir) / METRICS_FILE
        self.enabled = enabled
        self._file: IO[str] | None = None
        if not enabled:
            return
        if self.path.exists():
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")

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
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()

    def close(self) -> None:
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
