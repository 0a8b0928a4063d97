"""Metrics tracking: always a local `metrics.jsonl`, plus accelerate's trackers when configured.

The pipeline builds `Accelerator(log_with=[...], project_dir=run_dir)`; `Tracker` starts those
trackers and writes one JSON line per `log` call on the main process (flushed, so a killed run
loses nothing). wandb runs offline automatically when no WANDB_API_KEY is set.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": scalar}; tensorboard's hparams take only scalars and strings."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_config(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value if value is not None else "None"
        else:
            out[name] = str(value)
    return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; None reads back as "missing"
    return value


class Tracker:
    def __init__(self, run_dir, accelerator, backends=(), project: str = "spa-rl",
                 run_name: str | None = None, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        backends = list(backends)
        if "wandb" in backends and not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        self._trackers_on = bool(getattr(accelerator, "log_with", None))
        if self._trackers_on:
            init_kwargs = {"wandb": {"dir": str(self.run_dir)}}
            if run_name:
                init_kwargs["wandb"]["name"] = run_name
            accelerator.init_trackers(project, config=_flat_config(config or {}), init_kwargs=init_kwargs)
        self._file = None
        self._points = 0
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def log(self, metrics: dict[str, float], stage: str, step: int) -> None:
        """Append {"stage", "step", **metrics} to metrics.jsonl and forward to the trackers as
        "<stage>/<name>" (main process only; other processes return at once)."""
        if not self.is_main:
            return
        row = {"stage": stage, "step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._trackers_on:
            scalars = {(k if "/" in k else f"{stage}/{k}"): v for k, v in row.items()
                       if k not in ("stage", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
            scalars[f"{stage}/step"] = int(step)
            # wandb drops points whose step goes backwards, and each stage counts from 0: use a
            # run-wide counter as the tracker step and keep the stage's own step as a metric
            self.accelerator.log(scalars, step=self._points)
            self._points += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._trackers_on:
            self.accelerator.end_training()


def read_metrics(run_dir, stage: str | None = None) -> list[dict[str, Any]]:
    """Rows of run_dir/metrics.jsonl, optionally of one stage, with each step's latest row only.

    metrics.jsonl is append-only, so a run killed after its last checkpoint leaves rows for steps
    that the resumed run (or a stage run again) logs a second time. Of the rows sharing stage, step
    and metric names the last one is kept, where it stands in the file; the rest are the killed
    attempt's and are dropped.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run; the rest of the file is good
    rows = [r for r in rows if stage is None or r.get("stage") == stage]
    keys = [(r.get("stage"), r.get("step"), frozenset(r)) for r in rows]
    last = {k: i for i, k in enumerate(keys)}
    return [r for i, (r, k) in enumerate(zip(rows, keys)) if last[k] == i]
