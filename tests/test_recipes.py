"""Every shipped recipe maps onto the typed config (no stale keys), and the launch configs parse."""

from pathlib import Path

import pytest

from rl.config import load_config
from rl.train import RunConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_the_recipe_table_is_complete():
    names = {p.stem for p in RECIPES}
    for env in ("textworld", "scienceworld"):
        assert {f"{env}_spa_ppo", f"{env}_ppo_terminal", f"{env}_grpo", f"{env}_dpo"} <= names
    assert {"quickstart", "alfworld_spa_ppo", "webshop_spa_ppo"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads(path):
    cfg = load_config(RunConfig, path)
    assert cfg.name == path.stem
    if "rl" in cfg.stages:
        n = cfg.rl.tasks_per_iter * cfg.rl.group_size
        assert n % cfg.rl.minibatch_size == 0
    if cfg.credit.mode == "spa" and "rl" in cfg.stages:
        assert "progress" in cfg.stages
    # the quickstarts and the CPU real-LM recipes use group advantages (see their comments)
    quick = path.stem in ("quickstart", "textworld_cpu", "scienceworld_cpu", "blocks_cpu") or path.stem.endswith("_quickstart")
    expected_algo = "grpo" if path.stem.endswith("_grpo") or quick else "ppo"
    if path.stem == "textworld_cpu":  # GiGPO's state groups gained most there (README)
        expected_algo = "gigpo"
    if "rl" in cfg.stages:
        assert cfg.rl.algo == expected_algo
    if path.stem.endswith("_dpo"):
        assert "dpo" in cfg.stages and "rl" not in cfg.stages
    if path.stem.endswith("ppo_terminal"):
        assert cfg.credit.mode == "terminal"
