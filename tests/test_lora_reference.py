"""With model.lora=true the KL and DPO reference is the SFT policy (DESIGN: the reference is where
RL starts), not the base the SFT adapter was trained on: the rl and dpo stages merge the SFT adapter
into the base and train a fresh LoRA on top, and what they save reloads as the policy they trained."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rl.config import load_config
from rl.models import ModelConfig, load_model, load_tokenizer, tiny_model
from rl.train import RunConfig, run
from rl.trajectory import Step, Trajectory, save_trajectories

ROOT = Path(__file__).resolve().parents[1]
PROMPT = torch.tensor([[5, 17, 300, 42, 7, 99, 250, 3]])


def _overrides(base_dir: Path, out: Path) -> list[str]:
    # the tiny policy rarely wins, so rewards give no gradient: the entropy bonus makes RL move it
    return [
        f"model.name={base_dir}", "model.lora=true", "model.lora_r=4", "model.lora_alpha=16", "stages=[sft]",
        "env.options={size: 2, num_train_tasks: 4, num_dev_tasks: 1, num_test_tasks: 2}", "num_threads=1",
        "rollout.max_turns=3", "rollout.max_new_tokens=4", "rollout.num_envs=4", "rollout.temperature=1.0",
        "sft.epochs=3", "sft.lr=1e-2", "sft.batch_size=2", "credit.mode=terminal",
        "rl.algo=grpo", "rl.iterations=2", "rl.tasks_per_iter=2", "rl.group_size=2", "rl.minibatch_size=4",
        "rl.ppo_epochs=2", "rl.lr=5e-2", "rl.kl_coef=0.5", "rl.ent_coef=0.5", "rl.eval_every=0", "rl.eval_at_start=false",
        "rl.keep_best=false", "rl.save_every=0", "dpo.batch_size=2", "dpo.lr=1e-2", "dpo.epochs=2",
        "dpo.warmup_ratio=0.0", "eval.compare_with_sft=false", f"output_dir={out}", "name=lora",
    ]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=PROMPT).logits


@pytest.fixture(scope="module")
def sft_cfg(tmp_path_factory):
    """A LoRA SFT policy saved as an adapter on a base that lives on disk (as with smollm2-135m)."""
    tmp = tmp_path_factory.mktemp("lora-ref")
    tok = load_tokenizer("tiny")
    base = tmp / "base"
    tiny_model(tok, hidden=32, layers=1).save_pretrained(base)
    tok.save_pretrained(base)
    cfg = load_config(RunConfig, ROOT / "recipes" / "quickstart.yaml", _overrides(base, tmp / "runs"))
    run(cfg)
    sft_dir = cfg.run_dir / "sft" / "model"
    assert (sft_dir / "adapter_config.json").exists() and not (sft_dir / "model.safetensors").exists()
    base_logits = _logits(load_model(ModelConfig(path=str(base)), tok))
    assert not torch.allclose(_sft_logits(cfg), base_logits, atol=1e-2)  # SFT moved the policy off the base
    return cfg


def _sft_logits(cfg) -> torch.Tensor:
    return _logits(load_model(ModelConfig(path=str(cfg.run_dir / "sft" / "model")), load_tokenizer("tiny")))


def _rows(cfg, stage: str) -> list[dict]:
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage]


def _spy(monkeypatch, module, name: str) -> list:
    """Record what the real `module.name` returns (the stage drops it after saving)."""
    real, returned = getattr(module, name), []

    def spy(*args, **kwargs):
        returned.append(real(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(module, name, spy)
    return returned


def test_rl_kl_reference_is_the_sft_policy_and_rl_model_reloads(sft_cfg, monkeypatch):
    from rl.trainers import ppo

    trained = _spy(monkeypatch, ppo, "train_rl")
    cfg = replace(sft_cfg, stages=["rl"])
    run(cfg)
    rl_rows = [r for r in _rows(cfg, "rl") if "kl_ref" in r]
    assert [r["step"] for r in rl_rows] == [1, 2]
    assert rl_rows[0]["kl_ref"] < 1e-6  # before the first update the policy is its reference
    assert rl_rows[1]["kl_ref"] > 1e-4  # and the KL is to a fixed reference the update moved away from

    policy = trained[0]
    with policy.disable_adapter():  # the reference the trainer used
        torch.testing.assert_close(_logits(policy), _sft_logits(cfg), atol=1e-5, rtol=1e-4)
    rl_dir = cfg.run_dir / "rl" / "model"
    assert (rl_dir / "model.safetensors").exists() and not (rl_dir / "adapter_config.json").exists()
    reloaded = load_model(ModelConfig(path=str(rl_dir)), load_tokenizer(str(rl_dir)))
    assert not torch.allclose(_logits(policy), _sft_logits(cfg), atol=1e-3)  # RL changed the policy
    torch.testing.assert_close(_logits(reloaded), _logits(policy), atol=1e-5, rtol=1e-4)


def test_dpo_reference_is_the_sft_policy_and_dpo_model_reloads(sft_cfg, monkeypatch):
    from rl.trainers import dpo

    def traj(i, task, first_action, outcome):
        return Trajectory(i, task, [Step("You are in a room.", first_action, True)], outcome, outcome == 1.0,
                          system_prompt="Find the key.")

    trajs = [traj(0, "a", "go north", 1.0), traj(1, "a", "go south", 0.0),
             traj(2, "b", "take key", 1.0), traj(3, "b", "open door", 0.0)]
    save_trajectories(trajs, sft_cfg.run_dir / "explore" / "trajectories")
    trained = _spy(monkeypatch, dpo, "train_dpo")
    cfg = replace(sft_cfg, stages=["dpo"])
    run(cfg)
    steps = [r for r in _rows(cfg, "dpo") if "dpo/rewards/chosen" in r]
    assert len(steps) == 2
    # rewards = beta * (log pi - log pi_ref): zero before the first update iff the reference is the
    # policy the stage started from, which is the SFT policy (below)
    assert abs(steps[0]["dpo/rewards/chosen"]) < 1e-6 and abs(steps[0]["dpo/rewards/rejected"]) < 1e-6
    assert abs(steps[1]["dpo/rewards/margins"]) > 1e-4

    policy = trained[0]
    with policy.disable_adapter():
        torch.testing.assert_close(_logits(policy), _sft_logits(cfg), atol=1e-5, rtol=1e-4)
    dpo_dir = cfg.run_dir / "dpo" / "model"
    assert (dpo_dir / "model.safetensors").exists() and not (dpo_dir / "adapter_config.json").exists()
    reloaded = load_model(ModelConfig(path=str(dpo_dir)), load_tokenizer(str(dpo_dir)))
    torch.testing.assert_close(_logits(reloaded), _logits(policy), atol=1e-5, rtol=1e-4)
