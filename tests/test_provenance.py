"""runs/<name>/provenance.json: what produced a run, checked field by field against the sources."""

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from accelerate import Accelerator

from rl import provenance as prov

ROOT = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_entry_names_packages_code_device_python_and_command(monkeypatch):
    import torch
    import transformers

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("WANDB_API_KEY", "secret")  # not a launch variable: never recorded
    entry = prov.provenance(Accelerator(cpu=True), ["sft", "rl"])
    assert entry["stages"] == ["sft", "rl"]
    assert entry["packages"]["torch"] == torch.__version__
    assert entry["packages"]["transformers"] == transformers.__version__
    assert set(entry["packages"]) >= {"torch", "transformers", "trl", "accelerate", "peft"}
    for name in set(prov.PACKAGES) - set(entry["packages"]):  # left out only when not installed
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.version(name)
    if (ROOT / ".git").exists():
        assert entry["git"]["commit"] == _git(ROOT, "rev-parse", "HEAD")
        assert isinstance(entry["git"]["dirty"], bool)
    assert entry["device"] == {"type": "cpu", "name": entry["device"]["name"], "num_processes": 1,
                               "mixed_precision": "no", "distributed_type": "NO"}
    assert entry["python"] == platform.python_version()
    assert entry["command"]["argv"] == [sys.executable, *sys.orig_argv[1:]] and "pytest" in entry["command"]["argv"]
    assert entry["command"]["launch_env"] == {"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "1"}
    json.dumps(entry)  # JSON-able as it is


def test_git_state_commit_dirty_and_outside_a_checkout(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "rl").mkdir(parents=True)
    (repo / "rl" / "a.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "rl/a.py")
    _git(repo, "commit", "-q", "-m", "one")
    monkeypatch.setattr(prov, "CODE_DIR", (repo / "rl").resolve())
    assert prov.git_state() == {"commit": _git(repo, "rev-parse", "HEAD"), "dirty": False}
    (repo / "rl" / "new.py").write_text("")  # untracked: not dirty (as git describe --dirty)
    assert prov.git_state()["dirty"] is False
    (repo / "rl" / "a.py").write_text("x = 2\n")
    assert prov.git_state()["dirty"] is True
    # code installed into a folder that merely lies inside some checkout: not that checkout's commit
    (repo / "site" / "rl").mkdir(parents=True)
    monkeypatch.setattr(prov, "CODE_DIR", (repo / "site" / "rl").resolve())
    assert prov.git_state() == {"commit": None, "dirty": None}
    (tmp_path / "wheel" / "rl").mkdir(parents=True)  # no checkout at all
    monkeypatch.setattr(prov, "CODE_DIR", (tmp_path / "wheel" / "rl").resolve())
    assert prov.git_state() == {"commit": None, "dirty": None}


def test_each_invocation_appends_an_entry_atomically(tmp_path):
    acc = Accelerator(cpu=True)
    prov.write_provenance(tmp_path, acc, ["sft", "explore"])
    path = prov.write_provenance(tmp_path, acc, ["eval"])
    assert [e["stages"] for e in json.loads(path.read_text())] == [["sft", "explore"], ["eval"]]
    assert [p.name for p in tmp_path.iterdir()] == ["provenance.json"]  # no temp file left
