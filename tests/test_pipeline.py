"""End-to-end: every stage on a tiny config, in-process and under a 2-process accelerate launch;
bad recipes fail within seconds with a one-line message."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.tiny_hidden=32", "model.tiny_layers=1",
    "env.options={size: 2, num_train_tasks: 6, num_dev_tasks: 1, num_test_tasks: 4}",
    "rollout.max_turns=4", "rollout.max_new_tokens=4", "rollout.num_envs=4",
    "sft.epochs=1", "sft.batch_size=2", "explore.rollouts_per_task=2",
    "progress.epochs=1", "progress.batch_size=4", "progress.val_fraction=0.25",
    "rl.iterations=2", "rl.tasks_per_iter=2", "rl.group_size=2", "rl.minibatch_size=4",
    "rl.eval_every=1", "rl.save_every=1", "num_threads=1",
]


def _run(args, cwd, env=None, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_every_stage_runs_and_writes_its_artifacts(tmp_path, capsys):
    from rl.config import load_config
    from rl.train import RunConfig, run

    cfg = load_config(RunConfig, ROOT / "recipes" / "quickstart.yaml", TINY + [f"output_dir={tmp_path}", "name=e2e"])
    results = run(cfg)
    run_dir = tmp_path / "e2e"
    for path in ("config.yaml", "metrics.jsonl", "report.html", "sft/model/config.json", "sft/demos",
                 "explore/trajectories", "progress/estimator", "rl/model/config.json", "eval/results.json",
                 "plots/credit_heatmap.png"):
        assert (run_dir / path).exists(), path
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["rl"]["iterations"] == 2
    (entry,) = json.loads((run_dir / "provenance.json").read_text())  # what produced the run (test_provenance.py)
    assert entry["stages"] == ["sft", "explore", "progress", "rl", "eval"] and entry["device"]["num_processes"] == 1
    assert "provenance.json" in (run_dir / "report.html").read_text()
    timing = json.loads((run_dir / "timing.json").read_text())  # every stage finished, none left "running"
    assert list(timing) == entry["stages"] and all(set(t) == {"wall_s", "finished_utc"} for t in timing.values())
    rows = _metrics(run_dir)
    stages = {r["stage"] for r in rows}
    assert {"sft", "explore", "progress", "rl", "eval"} <= stages
    assert all("step" in r for r in rows)
    evals = [r for r in rows if r["stage"] == "eval" and "policy" in r]
    assert [r["policy"] for r in evals] == ["sft", "rl"]
    during_rl = [r for r in rows if r["stage"] == "eval" and "policy" not in r]
    assert len(during_rl) == 3  # start, 1, 2
    assert all(r["eval/episodes"] == 1 for r in during_rl)  # on the one dev task (env.dev_split), never test
    selected = [r for r in rows if "selected_iteration" in r]  # rl.keep_best: the best dev evaluation
    assert len(selected) == 1 and selected[0]["selected_success"] == max(r["eval/success_rate"] for r in during_rl)
    for r in evals:
        for key in ("eval/success_rate", "eval/grounding_accuracy", "eval/mean_turns"):
            assert 0.0 <= r[key] <= (4 if key == "eval/mean_turns" else 1.0)
    assert set(json.loads((run_dir / "eval" / "results.json").read_text())) == {"sft", "rl"}
    assert results["eval/episodes"] == 4
    assert [r["step"] for r in rows if r["stage"] == "rl" and "selected_iteration" not in r] == [1, 2]
    assert all("reward" in r and "kl_ref" in r for r in rows if r["stage"] == "rl" and "selected_iteration" not in r)

    # the eval CLI on the final checkpoint reproduces the eval stage's numbers
    from rl.eval import main as eval_main

    assert eval_main([str(ROOT / "recipes" / "quickstart.yaml"), "--checkpoint", str(run_dir / "rl" / "model"),
                      *TINY, f"output_dir={tmp_path}", "name=e2e"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.rindex("\n{") + 1:])
    assert printed["eval/success_rate"] == results["eval/success_rate"]

    # a stage re-runs alone from the artifacts on disk; resume skips finished stages
    cfg.stages, cfg.resume = ["eval"], False
    again = run(cfg)
    assert again["eval/success_rate"] == results["eval/success_rate"]  # greedy eval is deterministic
    cfg.stages, cfg.resume = ["sft", "explore"], True
    t0 = time.time()
    run(cfg)
    assert time.time() - t0 < 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_accelerate_launch(tmp_path):
    args = ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml"),
            "--main_process_port", str(_free_port()), "-m", "rl.train", str(ROOT / "recipes" / "quickstart.yaml"),
            *TINY, f"output_dir={tmp_path}", "name=e2e2", "stages=[sft,explore,progress,rl,eval]"]
    proc = _run(args, ROOT, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "e2e2"
    rows = _metrics(run_dir)
    rl_rows = [r for r in rows if r["stage"] == "rl" and "selected_iteration" not in r]
    assert [r["step"] for r in rl_rows] == [1, 2]  # logged once (main process), not once per rank
    assert len([r for r in rows if "selected_iteration" in r]) == 1  # rl.keep_best agreed across ranks
    evals = [r for r in rows if r["stage"] == "eval" and "policy" in r]
    assert len(evals) == 2 and all(r["eval/episodes"] == 4 for r in evals)  # gathered from both ranks
    assert (run_dir / "rl" / "model" / "config.json").exists()
    (entry,) = json.loads((run_dir / "provenance.json").read_text())  # written once, by the main process
    assert entry["device"]["num_processes"] == 2 and entry["command"]["launch_env"]["WORLD_SIZE"] == "2"
    assert "rl.train" in entry["command"]["argv"] and "name=e2e2" in entry["command"]["argv"]


def _fails_fast(tmp_path, overrides, recipe=None):
    t0 = time.time()
    proc = _run(["-m", "rl.train", str(recipe or ROOT / "recipes" / "quickstart.yaml"), *overrides,
                 f"output_dir={tmp_path}"], ROOT, timeout=60)
    assert proc.returncode == 2
    assert time.time() - t0 < 30
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert not (tmp_path / "quickstart").exists()  # nothing ran
    return lines[0]


def test_typo_in_key_fails_fast(tmp_path):
    msg = _fails_fast(tmp_path, ["rl.learning_rate=1e-4"])
    assert msg.startswith("error: unknown key 'rl.learning_rate'; allowed keys under 'rl': algo,")
    assert " lr," in msg


def test_wrong_type_fails_fast(tmp_path):
    assert _fails_fast(tmp_path, ["rl.iterations=many"]) == "error: rl.iterations: expected an integer, got 'many'"


def test_missing_env_data_dir_fails_fast(tmp_path):
    msg = _fails_fast(tmp_path, ["env.name=alfworld", f"env.options={{data_dir: {tmp_path}/nope}}"])
    assert "alfworld-download" in msg and "env.data_dir" in msg


def test_missing_model_path_fails_fast(tmp_path):
    msg = _fails_fast(tmp_path, [f"model.name={tmp_path}/no-such-model"])
    assert msg == (f"error: model {str(tmp_path / 'no-such-model')!r} is not a built-in ['tiny', 'tiny-llama3', "
                   "'smollm2-135m'], not an existing directory, and not a hub id ('org/name')")


USER_ENV = [
    "env.name=tests.user_env:EchoEnv", "env.options={num_train: 12}", "stages=[sft,explore,rl,eval]",
    "credit.mode=terminal", "model.tiny_hidden=64", "model.tiny_layers=2", "rollout.max_turns=3",
    "rollout.max_new_tokens=4", "rollout.num_envs=4", "sft.epochs=20", "sft.lr=3e-3", "sft.batch_size=4",
    "explore.rollouts_per_task=1", "rl.iterations=1", "rl.tasks_per_iter=2", "rl.group_size=2",
    "rl.minibatch_size=4", "rl.eval_every=1", "num_threads=1",
]


@pytest.mark.slow
def test_a_users_plain_env_runs_the_whole_pipeline(tmp_path):
    """tests/user_env.py: tasks/reset/step/expert_actions only, named by module path in the recipe."""
    from envs.base import first_command_line
    from rl.models import load_tokenizer
    from rl.train import main
    from rl.trajectory import load_trajectories, tokenize_trajectory

    assert main([str(ROOT / "recipes" / "quickstart.yaml"), *USER_ENV, f"output_dir={tmp_path}", "name=user"]) == 0
    run_dir = tmp_path / "user"
    tok = load_tokenizer(str(run_dir / "sft" / "model"))
    demos = load_trajectories(run_dir / "sft" / "demos")
    assert len(demos) == 12 and all(d.system_prompt == "" for d in demos)
    text = tok.decode(tokenize_trajectory(tok, demos[0]).input_ids)
    assert text.startswith("<|im_start|>user\nSay north.<|im_end|>\n<|im_start|>assistant\nnorth<|im_end|>")
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results) == {"sft", "rl"} and all(r["eval/episodes"] == 4 for r in results.values())
    assert results["sft"]["eval/success_rate"] >= 0.75  # cloned from demos that had no system prompt
    # replies were read by the default parser, first_command_line: valid exactly when it gives the word asked for
    steps = [s for label in ("sft", "rl") for t in load_trajectories(run_dir / "eval" / f"trajectories_{label}")
             for s in t.steps] + [s for t in load_trajectories(run_dir / "explore" / "trajectories") for s in t.steps]
    assert any(s.valid for s in steps) and not all(s.valid for s in steps)  # explore samples at temperature 0.5
    for s in steps:
        assert s.valid == (first_command_line(s.action) == s.observation.split("Say ")[-1].rstrip(".")), s


def test_env_without_a_required_method_fails_at_start(tmp_path):
    msg = _fails_fast(tmp_path, ["env.name=tests.user_env:EnvWithoutStep", "env.options={}"])
    assert msg == ("error: env 'tests.user_env:EnvWithoutStep' (EnvWithoutStep) has no step(); an env needs "
                   "tasks(split), reset(task) and step(action) (see envs/base.py)")
    msg = _fails_fast(tmp_path, ["env.name=tests.user_env:EnvWithoutExpert", "env.options={}"])
    assert msg == ("error: env 'tests.user_env:EnvWithoutExpert' has no expert_actions(task), which the sft stage "
                   "clones; remove sft from stages")
