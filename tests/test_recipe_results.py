"""benchmarks/recipe_results.py on hand-made run dirs (numbers checked by hand), and the per-stage
wall times rl.train records in runs/<name>/timing.json."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from rl.train import StageClock, write_stage_time

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("recipe_results", ROOT / "benchmarks" / "recipe_results.py")
rr = importlib.util.module_from_spec(spec)
sys.modules["recipe_results"] = rr  # its dataclass looks its module up while being built
spec.loader.exec_module(rr)


def make_run(root: Path, name: str, seed: int, results: dict, stage_s: dict | None) -> Path:
    d = root / f"{name}_s{seed}"
    (d / "eval").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"name": f"{name}_s{seed}", "seed": seed,
                                                   "env": {"eval_split": "test"}}))
    (d / "eval" / "results.json").write_text(json.dumps(
        {label: {"eval/success_rate": v, "eval/mean_score": v} for label, v in results.items()}))
    for stage, s in (stage_s or {}).items():
        write_stage_time(d, stage, s)
    return d


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def test_table_rows_and_t_interval_by_hand(tmp_path, capsys):
    # recipe tw, 3 seeds: changes +20, +5, +10 points; recipe other: 1 seed, rl worse by 10
    dirs = [make_run(tmp_path, "tw", 0, {"sft": 0.40, "rl": 0.60}, {"sft": 60.0, "rl": 540.0, "eval": 120.0}),
            make_run(tmp_path, "tw", 1, {"sft": 0.50, "rl": 0.55}, {"sft": 60.0, "rl": 600.0, "eval": 60.0}),
            make_run(tmp_path, "tw", 2, {"sft": 0.30, "rl": 0.40}, {"sft": 90.0, "rl": 630.0, "eval": 60.0}),
            make_run(tmp_path, "other", 7, {"sft": 0.5, "rl": 0.4}, None)]
    assert rr.main([str(d) for d in dirs]) == 0
    rows = _rows(capsys.readouterr().out)
    per_seed = {(r[0], r[1]): r for r in rows if r[0] != "recipe" and len(r) == 7 and r[2] == "test"}
    assert per_seed[("tw", "0")][3:] == ["40.0%", "60.0% (rl)", "+20.0", "12.0"]  # (60+540+120)/60 min
    assert per_seed[("tw", "1")][3:] == ["50.0%", "55.0% (rl)", "+5.0", "12.0"]
    assert per_seed[("tw", "2")][3:] == ["30.0%", "40.0% (rl)", "+10.0", "13.0"]
    assert per_seed[("other", "7")][3:] == ["50.0%", "40.0% (rl)", "-10.0", "n/a"]  # no timing.json
    summary = {r[0]: r for r in rows if r[0] != "recipe" and r[2] != "test"}
    # mean 35/3 = 11.67; s^2 = (8.333^2 + 6.667^2 + 1.667^2) / 2 = 58.33, s = 7.638;
    # half width = t_{0.975,2} * s / sqrt(3) = 4.3027 * 7.638 / 1.7321 = 18.97
    assert summary["tw"][1:] == ["3", "40.0%", "51.7%", "+11.7", "[-7.3, +30.6]", "12.3"]
    assert summary["other"][1:] == ["1", "50.0%", "40.0%", "-10.0", "n/a", "n/a"]


def test_mean_ci_matches_the_formula():
    m, lo, hi = rr.mean_ci([20.0, 5.0, 10.0])
    half = 4.302652729911275 * (175 / 3 / 3) ** 0.5  # s^2 = 175/3, divided by n = 3
    assert m == pytest.approx(35 / 3) and lo == pytest.approx(m - half) and hi == pytest.approx(m + half)
    assert rr.mean_ci([4.0])[0] == 4.0 and all(x != x for x in rr.mean_ci([4.0])[1:])  # nan bounds


def test_final_is_the_last_policy_and_sft_only_runs(tmp_path):
    only_sft = rr.read_run(make_run(tmp_path, "a", 0, {"sft": 0.3}, {"sft": 30.0, "eval": 30.0}))
    assert (only_sft.final_label, only_sft.final, only_sft.change_points, only_sft.wall_s) == ("sft", 0.3, 0.0, 60.0)
    dpo = rr.read_run(make_run(tmp_path, "b", 3, {"sft": 0.25, "dpo": 0.5}, None))
    assert (dpo.recipe, dpo.seed, dpo.final_label, dpo.change_points) == ("b", 3, "dpo", 25.0)
    assert rr.recipe_name("tw_cpu_s12", 12) == "tw_cpu" and rr.recipe_name("tw_cpu_s1", 12) == "tw_cpu_s1"


def test_missing_results_fails_with_one_line(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.yaml").write_text("name: x\nseed: 0\n")
    assert rr.main([str(tmp_path / "x")]) == 2
    assert "no eval/results.json" in capsys.readouterr().err


def test_stage_times_merge_across_invocations(tmp_path):
    write_stage_time(tmp_path, "rl", 20.04)
    write_stage_time(tmp_path, "sft", 10.0)
    first = json.loads((tmp_path / "timing.json").read_text())
    assert list(first) == ["sft", "rl"] and first["rl"]["wall_s"] == 20.0  # pipeline order, 0.1 s
    write_stage_time(tmp_path, "sft", 5.0)  # a stage run again replaces its entry; the others stay
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert {k: v["wall_s"] for k, v in timing.items()} == {"sft": 5.0, "rl": 20.0}
    assert not (tmp_path / "timing.json.tmp").exists()


def test_stage_clock_counts_an_interrupted_attempt(tmp_path):
    """A killed attempt's seconds survive in timing.json (heartbeat) and are added when a later
    attempt finishes the stage; recipe_results reads only finished entries."""
    first = StageClock(tmp_path, "rl", beat_s=0.05)
    first.start -= 100.0  # as if the attempt had run 100 s
    time.sleep(0.3)
    first._stop.set()  # killed: no finish(), the last heartbeat is all that is left
    first._thread.join()
    running = json.loads((tmp_path / "timing.json").read_text())["rl"]
    assert "wall_s" not in running and 100.0 <= running["running_s"] < 101.0
    write_stage_time(tmp_path, "sft", 7.0)
    assert rr_stage_s(tmp_path) == {"sft": 7.0}  # the unfinished rl entry is not a stage time
    second = StageClock(tmp_path, "rl", beat_s=60)
    assert second.earlier == [running["running_s"]]
    second.start -= 20.0
    second.finish()
    rl = json.loads((tmp_path / "timing.json").read_text())["rl"]
    assert rl["attempts_s"][0] == running["running_s"] and 20.0 <= rl["attempts_s"][1] < 21.0
    assert rl["wall_s"] == pytest.approx(sum(rl["attempts_s"]), abs=0.11)
    third = StageClock(tmp_path, "rl", beat_s=60)  # run again after it finished: a new count
    assert third.earlier == []
    third.abandon()  # a failed attempt leaves its seconds for the next one
    assert json.loads((tmp_path / "timing.json").read_text())["rl"]["attempts_s"] == []
    assert StageClock(tmp_path, "rl", beat_s=60).earlier[0] < 1.0


def rr_stage_s(run: Path) -> dict:
    (run / "config.yaml").write_text("name: x_s0\nseed: 0\n")
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "results.json").write_text(json.dumps({"rl": {"eval/success_rate": 0.5}}))
    return rr.read_run(run).stage_s


def _save_episodes(run: Path, label: str, won: dict[str, bool], refused: int = 0) -> None:
    """One episode per game: a refused action then a valid one for the first `refused` games,
    else a single valid action."""
    from rl.trajectory import Step, Trajectory, save_trajectories

    trajs = [Trajectory(i, task, [Step("obs", "bad", False)] * (i < refused) + [Step("obs", "act", True)], float(w), w)
             for i, (task, w) in enumerate(won.items())]
    save_trajectories(trajs, run / "eval" / f"trajectories_{label}")


def test_flips_pair_the_games_and_sign_test_by_hand(tmp_path, capsys):
    # SFT wins g0 g1 g2; RL wins g1 g2 g3 g4 g5 (g6 lost by both): both 2, gained 3, lost 1
    d = make_run(tmp_path, "tw", 0, {"sft": 3 / 7, "rl": 5 / 7}, None)
    _save_episodes(d, "sft", {f"g{i}": i in (0, 1, 2) for i in range(7)})
    _save_episodes(d, "rl", {f"g{i}": i in (1, 2, 3, 4, 5) for i in range(7)}, refused=3)
    f = rr.read_flips(d)
    assert (f.games, f.both, f.gained, f.lost) == (7, 2, ["g3", "g4", "g5"], ["g0"])
    # 4 discordant games split 3 / 1: P(X <= 1) = (1 + 4) / 16, two-sided 10 / 16
    assert f.p_value == pytest.approx(0.625)
    assert f.grounding == {"sft": 1.0, "final": 0.7}  # 7 of 7 actions valid; 7 of 10
    assert rr.sign_test(0, 0) == 1.0 and rr.sign_test(6, 0) == pytest.approx(2 / 64)
    assert rr.sign_test(2, 2) == 1.0  # an even split is capped at 1
    assert rr.main([str(d), "--flips"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert ["tw", "0", "7", "2", "3", "1", "0.625", "100.0%", "70.0%"] in rows


def test_flips_need_both_policies_episodes(tmp_path, capsys):
    d = make_run(tmp_path, "tw", 1, {"sft": 0.5, "rl": 0.5}, None)
    _save_episodes(d, "sft", {"g0": True})
    assert rr.main([str(d), "--flips"]) == 2
    assert "no eval/trajectories_rl" in capsys.readouterr().err
    only_sft = make_run(tmp_path, "a", 0, {"sft": 0.3}, None)
    with pytest.raises(ValueError, match="needs an SFT and a later policy"):
        rr.read_flips(only_sft)


def test_dev_curve_reads_the_rl_evaluations_and_the_kept_iteration(tmp_path, capsys):
    d = make_run(tmp_path, "bl", 1, {"sft": 0.4, "rl": 0.5}, None)
    rows = [{"stage": "eval", "step": 0, "eval/success_rate": 0.42}, {"stage": "rl", "step": 1, "success": 0.3},
            {"stage": "eval", "step": 4, "eval/success_rate": 0.58}, {"stage": "eval", "step": 8, "eval/success_rate": 0.35},
            {"stage": "rl", "step": 8, "selected_iteration": 4, "selected_success": 0.58},
            # the eval stage's rows on test share the stage name; "policy" tells them apart
            {"stage": "eval", "step": 0, "eval/success_rate": 0.4, "policy": "sft"},
            {"stage": "eval", "step": 1, "eval/success_rate": 0.5, "policy": "rl"}]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert rr.dev_curve(d) == ([(0, 0.42), (4, 0.58), (8, 0.35)], 4)
    assert rr.main([str(d), "--dev"]) == 0
    row = [r for r in _rows(capsys.readouterr().out) if r[0] == "bl" and len(r) == 4][0]
    assert row == ["bl", "1", "0: 42% / 4: 58% / 8: 35%", "4"]


def test_paired_differences_by_hand(tmp_path, capsys):
    # b and a from the same SFT on seeds 0-2; c only on seed 0, from another SFT; d shares no seed
    dirs = [make_run(tmp_path, "a", 0, {"sft": 0.40, "rl": 0.60}, None),
            make_run(tmp_path, "a", 1, {"sft": 0.50, "rl": 0.55}, None),
            make_run(tmp_path, "a", 2, {"sft": 0.30, "rl": 0.40}, None),
            make_run(tmp_path, "b", 0, {"sft": 0.40, "rl": 0.50}, None),
            make_run(tmp_path, "b", 1, {"sft": 0.50, "rl": 0.50}, None),
            make_run(tmp_path, "b", 2, {"sft": 0.30, "rl": 0.20}, None),
            make_run(tmp_path, "c", 0, {"sft": 0.45, "rl": 0.45}, None),
            make_run(tmp_path, "d", 9, {"sft": 0.45, "rl": 0.45}, None)]
    assert rr.main([str(d) for d in dirs] + ["--paired"]) == 0
    rows = {r[0]: r[1:] for r in _rows(capsys.readouterr().out) if " - " in r[0]}
    # a - b: +10, +5, +20; mean 11.67, s = 7.638, half = 4.3027 * 7.638 / sqrt(3) = 18.97
    assert rows["a - b"] == ["3", "3 of 3", "0: +10.0 / 1: +5.0 / 2: +20.0", "+11.7", "[-7.3, +30.6]"]
    assert rows["a - c"] == ["1", "0 of 1", "0: +15.0", "+15.0", "n/a"]
    assert rows["b - c"] == ["1", "0 of 1", "0: +5.0", "+5.0", "n/a"]
    assert not any("d" in k.split(" - ") for k in rows)  # d shares no seed with anyone
