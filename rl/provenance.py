"""What produced a run: `runs/<name>/provenance.json`, one entry per invocation (newest last).

Each entry: UTC start time, the stages it ran, package versions (those installed of torch,
transformers, trl, accelerate, peft, datasets, deepspeed, vllm), the git commit of this code and
whether tracked files differ from it (None for both outside a git checkout, e.g. a wheel install),
the device and number of processes, the Python version, and the launch command (the interpreter's
argv, `-m` included, and the launcher's environment: WORLD_SIZE, RANK, ..., ACCELERATE_*).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "deepspeed", "vllm")
# set by torchrun / accelerate launch / deepspeed; ACCELERATE_* are added too
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
CODE_DIR = Path(__file__).resolve().parent  # the rl package


def package_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(CODE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """{"commit", "dirty"} of the checkout holding this code; None for both when the code is not in
    one (a checkout that merely contains site-packages does not count). Untracked files are not
    "dirty" (as `git describe --dirty`)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() / "rl" != CODE_DIR:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def device_info(accelerator) -> dict[str, Any]:
    import torch

    cuda = accelerator.device.type == "cuda"
    return {"type": accelerator.device.type,
            "name": torch.cuda.get_device_name(accelerator.device) if cuda else platform.processor() or platform.machine(),
            "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
            "distributed_type": accelerator.distributed_type.value}


def provenance(accelerator, stages: list[str]) -> dict[str, Any]:
    return {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages": list(stages),
        "packages": package_versions(),
        "git": git_state(),
        "device": device_info(accelerator),
        "python": platform.python_version(),
        # as launched (-m rl.train included, unlike sys.argv), with the interpreter's full path
        "command": {"argv": [sys.executable, *sys.orig_argv[1:]], "cwd": os.getcwd(),
                    "launch_env": {k: v for k, v in sorted(os.environ.items())
                                   if k in LAUNCH_ENV or k.startswith("ACCELERATE_")}},
    }


def write_provenance(run_dir: Path, accelerator, stages: list[str]) -> Path:
    """Append this invocation's entry to run_dir/provenance.json (main process; temp file + rename)."""
    path = Path(run_dir) / "provenance.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    entries.append(provenance(accelerator, stages))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entries, indent=2) + "\n")
    tmp.replace(path)
    return path
