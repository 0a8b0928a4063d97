"""Atomic training checkpoints through `accelerator.save_state` (model, optimizer, RNG states).

Layout: `ckpt_root/step_{N}/` holds accelerate's state files plus `extra_state.json` (iteration
counter and anything else the trainer needs). A checkpoint is written into `step_{N}.tmp` and
renamed only when complete, so a killed run never leaves a half-written `step_{N}`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

EXTRA_STATE = "extra_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / EXTRA_STATE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(accelerator, ckpt_root, step: int, extra_state: dict, keep: int = 2) -> Path:
    """Save the prepared objects' state + `extra_state` as ckpt_root/step_{step}; keep the last
    `keep` checkpoints. Every process must call it (DeepSpeed shards are saved per rank)."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f"step_{step}.tmp"
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / EXTRA_STATE).write_text(json.dumps(extra_state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in _complete_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(ckpt_root) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = _complete_checkpoints(Path(ckpt_root))
    return found[-1][1] if found else None


def load_checkpoint(accelerator, path) -> dict:
    """Restore the prepared objects (and RNG states) from `path`; return its extra state."""
    path = Path(path)
    if not (path / EXTRA_STATE).exists():
        raise FileNotFoundError(f"checkpoint {path} is incomplete (no {EXTRA_STATE})")
    accelerator.load_state(str(path))
    return json.loads((path / EXTRA_STATE).read_text())
