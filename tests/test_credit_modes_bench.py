"""benchmarks/credit_modes.py: the harness end to end on 2 seeds x 2 modes with a tiny budget, its
resumability (finished cells are skipped), and its statistics by hand."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("credit_modes_bench", ROOT / "benchmarks" / "credit_modes.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

TINY = ["model.tiny_hidden=32", "model.tiny_layers=1", "env.options.size=2", "env.options.num_train_tasks=4",
        "env.options.num_dev_tasks=4", "env.options.num_test_tasks=4", "sft.epochs=1", "explore.rollouts_per_task=2",
        "progress.epochs=1", "progress.batch_size=4", "rollout.max_turns=4", "rollout.num_envs=4", "rl.iterations=2",
        "rl.tasks_per_iter=2", "rl.group_size=2", "rl.minibatch_size=4", "rl.ppo_epochs=1", "rl.eval_every=1"]


def test_mean_ci_and_paired_rows_by_hand():
    m, lo, hi = bench.mean_ci([0.5, 0.7, 0.6])
    half = 4.302653 * 0.1 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n), s = 0.1
    assert (m, lo, hi) == pytest.approx((0.6, 0.6 - half, 0.6 + half), abs=1e-6)
    assert math.isnan(bench.mean_ci([0.4])[1])
    data = {"base": {}, "cells": {(0, "terminal"): {"success": 0.5, "sft": 0.4, "wall_s": 10, "online_spearman": None},
                                  (1, "terminal"): {"success": 0.6, "sft": 0.5, "wall_s": 12, "online_spearman": None},
                                  (0, "spa"): {"success": 0.6, "sft": 0.4, "wall_s": 11, "online_spearman": None},
                                  (1, "spa"): {"success": 0.8, "sft": 0.5, "wall_s": 13, "online_spearman": None}}}
    text = bench.table(data, [0, 1], ["terminal", "spa"])
    # differences +10 and +20 points: mean 15, half-width t_{0.975,1} * 7.07 / sqrt(2) = 63.5
    assert "| spa - terminal | +15.0 [-48.5, +78.5] (n=2) |" in text
    assert "| terminal | 2 | 55.0 [-8.5, 118.5] | 11 |" in text
    # SPA against GiGPO, on the seeds both finished (seed 1 has no gigpo cell): one difference, no CI
    data["cells"][(0, "gigpo")] = {"success": 0.65, "sft": 0.4, "wall_s": 9, "online_spearman": None}
    text = bench.table(data, [0, 1], ["terminal", "spa", "gigpo"])
    assert "| gigpo - terminal | +15.0 (n=1) |" in text
    assert "| spa - gigpo | -5.0 (n=1) |" in text
    assert bench.paired_differences(["terminal", "spa", "spa-online", "gigpo"]) == [
        ("spa", "terminal"), ("spa-online", "terminal"), ("gigpo", "terminal"), ("spa", "gigpo"), ("spa-online", "spa")]
    assert bench.paired_differences(["terminal", "mc", "spa-mc"]) == [
        ("mc", "terminal"), ("spa-mc", "terminal"), ("spa-mc", "mc")]
    del data["cells"][(0, "gigpo")]
    # per seed: SFT start, each mode, the estimator's Spearman (none measured here); seed 2 not run
    data["base"][1] = {"wall_s": 5, "spearman": 0.25, "spearman_max": 0.5, "top_step_hit": 1.0}
    rows = bench.per_seed(data, [0, 1, 2], ["terminal", "spa"]).splitlines()
    assert rows[0] == "| seed | sft | terminal | spa | Spearman (ceiling) |"
    assert rows[2:] == ["| 0 | 40 | 50 | 60 | - |", "| 1 | 50 | 60 | 80 | 0.25 (0.50) |", "| 2 | - | - | - | - |"]
    # the online estimator's Spearman on its last RL batch, per seed, when spa-online ran
    data["cells"][(1, "spa-online")] = {"success": 0.7, "sft": 0.5, "wall_s": 14, "online_spearman": 0.4,
                                        "online_spearman_max": 0.45}
    rows = bench.per_seed(data, [0, 1], ["terminal", "spa", "spa-online"]).splitlines()
    assert rows[0].endswith("| Spearman (ceiling) | spa-online, last RL batch |")
    assert rows[2:] == ["| 0 | 40 | 50 | 60 | - | - | - |", "| 1 | 50 | 60 | 80 | 70 | 0.25 (0.50) | 0.40 (0.45) |"]


@pytest.mark.slow
def test_harness_end_to_end_and_resumes(tmp_path, capsys):
    # two cells at a time: the shared stages of both seeds first, then the four cells
    runs, out = tmp_path / "runs", tmp_path / "credit_modes.md"
    args = ["--seeds", "2", "--modes", "terminal,spa", "--runs", str(runs), "--out", str(out), "--jobs", "2"]
    for o in TINY:
        args += ["--set", o]
    assert bench.main(args) == 0
    for s in (0, 1):
        assert (runs / f"s{s}" / "progress" / "estimator").is_dir()
        for m in ("terminal", "spa"):
            cell = runs / f"s{s}_{m}"
            results = json.loads((cell / "eval" / "results.json").read_text())
            assert 0.0 <= results["rl"]["eval/success_rate"] <= 1.0
            assert (cell / "progress").resolve() == (runs / f"s{s}" / "progress").resolve()  # shared, not refit
    text = out.read_text()
    assert "| spa - terminal |" in text and "| terminal | 2 |" in text and "| spa | 2 |" in text
    # (one SFT epoch of a tiny model yields no parsable action, so no true progress reaches the
    # estimator's validation split here: faithfulness rows appear only when it does)
    # resumable: a second run finds every cell done and only rebuilds the table from the run dirs
    stamps = {p: p.stat().st_mtime for p in runs.glob("*/cell.json")}
    assert bench.main(args) == 0
    assert {p: p.stat().st_mtime for p in runs.glob("*/cell.json")} == stamps
    assert out.read_text() == text


def test_run_all_reports_failures_and_goes_on(monkeypatch, tmp_path):
    done = []

    def base(recipe, runs, s, overrides):
        if s == 2:
            raise RuntimeError("sft failed")
        done.append(("base", s))

    def cell(recipe, runs, s, m, overrides):
        if (s, m) == (1, "spa"):
            raise RuntimeError("boom")
        done.append((s, m))

    monkeypatch.setattr(bench, "run_base", base)
    monkeypatch.setattr(bench, "run_cell", cell)
    failed = bench.run_all("r.yaml", tmp_path, [0, 1, 2], ["terminal", "spa"], [], jobs=2)
    assert sorted(failed) == ["seed 1 spa: boom", "seed 2 sft+explore+progress: sft failed"]
    # seed 2's cells never start (no shared stages); every other cell ran
    assert sorted(d for d in done if d[0] != "base") == [(0, "spa"), (0, "terminal"), (1, "terminal")]
