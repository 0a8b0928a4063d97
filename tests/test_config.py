from dataclasses import dataclass, field
from typing import Literal

import pytest

from rl.config import ConfigError, build, load_config, parse_overrides
from rl.models import ModelConfig


@dataclass
class Inner:
    lr: float = 1e-3
    algo: Literal["ppo", "grpo"] = "ppo"
    layers: list[int] = field(default_factory=lambda: [1, 2])

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}: must be > 0")


@dataclass
class Outer:
    name: str = "x"
    seed: int = 0
    debug: bool = False
    inner: Inner = field(default_factory=Inner)
    model: ModelConfig = field(default_factory=ModelConfig)
    options: dict = field(default_factory=dict)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: run\ninner:\n  lr: 1e-4\n  algo: grpo\noptions: {size: 3}\n")
    cfg = load_config(Outer, p, ["inner.layers=[3]", "seed=7", "debug=true", "model.lora=true", "options.size=5"])
    assert cfg.name == "run" and cfg.seed == 7 and cfg.debug is True
    assert cfg.inner.lr == pytest.approx(1e-4) and cfg.inner.algo == "grpo" and cfg.inner.layers == [3]
    assert cfg.model.lora is True and cfg.options == {"size": 5}


@pytest.mark.parametrize("overrides,message", [
    (["inner.lr_rate=1"], "unknown key 'inner.lr_rate'; allowed keys under 'inner': lr, algo, layers"),
    (["inner.lr=fast"], "inner.lr: expected a number, got 'fast'"),
    (["inner.algo=dqn"], "inner.algo: 'dqn' is not allowed; choose one of ['ppo', 'grpo']"),
    (["seed=1.5"], "seed: expected an integer, got 1.5"),
    (["debug=maybe"], "debug: expected true or false, got 'maybe'"),
    (["inner.lr=-1"], "inner: lr=-1.0: must be > 0"),
    (["seed"], "override 'seed' must look like key.sub=value"),
    (["nme=x"], "unknown key 'nme'; allowed keys: name, seed"),
])
def test_bad_input_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, overrides)
    assert message in str(e.value)


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)


def test_override_values_parse_as_yaml():
    assert parse_overrides(["a.b=[1, 2]", "c=true", "d=hello", "e="]) == [
        ("a.b", [1, 2]), ("c", True), ("d", "hello"), ("e", "")]
    assert build(Outer, {"inner": {"layers": 4}}).inner.layers == [4]


def test_gigpo_credit_needs_the_gigpo_algorithm():
    from rl.train import RunConfig

    with pytest.raises(ConfigError, match="credit.mode=gigpo and rl.algo=gigpo go together"):
        load_config(RunConfig, None, ["credit.mode=gigpo"])
    cfg = load_config(RunConfig, None, ["credit.mode=gigpo", "rl.algo=gigpo"])
    assert cfg.rl.estimator == "given" and not cfg.rl.uses_critic


def test_mc_credit_is_refused_by_rl_and_terminal_with_gamma_gives_mc_returns():
    import torch

    from rl import algos
    from rl.train import RunConfig

    with pytest.raises(ConfigError, match="credit.mode='mc' gives returns.*credit.mode=terminal with rl.gamma"):
        load_config(RunConfig, None, ["credit.mode=mc"])
    assert load_config(RunConfig, None, ["credit.mode=mc", "stages=[sft,explore,progress]"]).credit.mode == "mc"
    # the alternative: terminal reward, the turn-level estimator discounts it to G_t = gamma^(T-t) R.
    # A group of two 2-step episodes, R = 1 and 0, gamma 0.5: G = [0.5, 1] and [0, 0]; minus the
    # turn means [0.25, 0.5]; over the unbiased std of {0.5, 1, 0, 0} = sqrt(0.6875 / 3)
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1]])
    adv, _ = algos.grpo_step_level(rewards, torch.zeros(2, 4), mask, [[1, 3], [1, 3]], torch.tensor([0, 0]), 0.5, 1.0)
    s = (0.6875 / 3) ** 0.5
    want = [[0, 0.25 / s, 0, 0.5 / s], [0, -0.25 / s, 0, -0.5 / s]]
    assert adv.flatten().tolist() == pytest.approx([x for row in want for x in row], abs=1e-5)


def test_keep_best_selects_on_a_dev_split_never_the_test_split():
    from rl.train import RunConfig

    for extra in ([], ["env.dev_split=test"]):
        with pytest.raises(ConfigError, match="rl.keep_best=true selects a checkpoint on env.dev_split"):
            load_config(RunConfig, None, ["rl.keep_best=true", *extra])
    cfg = load_config(RunConfig, None, ["rl.keep_best=true", "env.dev_split=dev"])
    assert cfg.rl.keep_best and cfg.env.dev_split == "dev"
