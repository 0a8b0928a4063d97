"""Every task family's quickstart recipe runs the whole pipeline (sft -> explore -> progress -> rl ->
eval) as shipped, with only its sizes cut down: few tasks, one RL iteration, a smaller tiny model.
So a fresh machine that passes the tests can run `python -m rl.train recipes/<family>_quickstart.yaml`."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMALL = [
    "model.tiny_hidden=32", "model.tiny_layers=1", "num_threads=1",
    "env.num_train_tasks=4", "env.num_demo_tasks=4", "eval.num_tasks=3",
    "rollout.max_turns=3", "rollout.num_envs=4",
    "sft.epochs=1", "sft.batch_size=2", "explore.rollouts_per_task=2",
    "progress.epochs=1", "progress.batch_size=4", "progress.val_fraction=0.25",
    "rl.iterations=1", "rl.tasks_per_iter=2", "rl.group_size=2", "rl.minibatch_size=4", "rl.grad_accum_steps=1",
    "rl.eval_every=0", "rl.keep_best=false", "rl.save_every=1",
]

# each family's own split sizes, cut down (game generation and engine searches scale with them)
FAMILIES = {
    "maze": ["env.options.num_train_tasks=4", "env.options.num_dev_tasks=2", "env.options.num_test_tasks=3"],
    "textnav": ["env.options.num_train_tasks=4", "env.options.num_dev_tasks=2", "env.options.num_test_tasks=3"],
    "wordle": ["env.options.num_train_tasks=4", "env.options.num_dev_tasks=2", "env.options.num_test_tasks=3"],
    "twenty_questions": ["env.options.num_train_tasks=4", "env.options.num_dev_tasks=2",
                         "env.options.num_test_tasks=3"],
    "chess": ["env.options.num_train_tasks=4", "env.options.num_dev_tasks=2", "env.options.num_test_tasks=3"],
    "twchallenge": ["env.options.num_train_games=4", "env.options.num_dev_games=2", "env.options.num_test_games=3"],
}


def _engine_missing() -> bool:
    from envs import EnvError

    try:
        from envs.chess_env import find_engine  # needs python-chess

        find_engine()
    except (ImportError, EnvError):
        return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_quickstart_runs_every_stage(family, tmp_path):
    if family == "chess" and _engine_missing():
        pytest.skip("no Stockfish binary (apt-get install stockfish)")
    from rl.config import load_config
    from rl.tracking import read_metrics
    from rl.trajectory import load_trajectories
    from rl.train import RunConfig, run

    recipe = ROOT / "recipes" / f"{family}_quickstart.yaml"
    cache = f"env.options.cache_dir={tmp_path / 'cache'}" if family in ("chess", "twchallenge") else None
    overrides = SMALL + FAMILIES[family] + ([cache] if cache else []) + [f"output_dir={tmp_path}", "name=q"]
    cfg = load_config(RunConfig, recipe, overrides)
    assert cfg.env.name == family and cfg.stages == ["sft", "explore", "progress", "rl", "eval"]
    run(cfg)
    run_dir = tmp_path / "q"
    for path in ("sft/model/config.json", "explore/trajectories", "progress/estimator", "rl/model/config.json"):
        assert (run_dir / path).exists(), path
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results) == {"sft", "rl"}
    assert all(r["eval/episodes"] == 3 for r in results.values())  # eval.num_tasks test tasks each
    sft_rows = read_metrics(run_dir, "sft")
    assert sft_rows and all(r["sft/loss"] > 0 for r in sft_rows if "sft/loss" in r)  # the expert's demos were cloned
    explored = load_trajectories(run_dir / "explore" / "trajectories")
    assert len(explored) == 8 and all(1 <= t.num_steps <= 3 for t in explored)  # 4 tasks x 2, max_turns 3
    assert [r["step"] for r in read_metrics(run_dir, "rl") if "success" in r] == [1]
