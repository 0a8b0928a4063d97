"""rl.credit.progress: loss, batching/gather invariance, truncation reporting, fit/save/load, early
stopping, LoRA, and a learning test against the keydoor env's ground-truth progress."""

import json
import random

import numpy as np
import pytest
import torch

from rl.credit import (ProgressConfig, ProgressEstimator, annotate_progress, checked_view, fit_progress_estimator,
                       progress_loss, step_rewards, CreditConfig)
from rl.credit.progress import collate
from rl.models import load_tokenizer, tiny_model
from rl.trajectory import Step, TokenView, Trajectory, TrajectoryError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def make_traj(tid, actions, outcome, obs_len=1):
    steps = [Step(" ".join(["The key is here."] * obs_len), a, True) for a in actions]
    return Trajectory(tid, "t", steps, outcome, outcome > 0, system_prompt="Open the door.")


def test_progress_loss_hand_computed():
    c = torch.tensor([[0.2, 0.3, 9.0], [1.0, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    R = torch.tensor([1.0, 0.0])
    # sums 0.5 and 1.5 -> ((0.5 - 1)^2 + (1.5 - 0)^2) / 2 = (0.25 + 2.25) / 2
    assert progress_loss(c, mask, R).item() == pytest.approx(1.25)


def test_batched_predictions_equal_single_ones(tok):
    """Right padding and the gather at step_ends must not change any trajectory's c_t."""
    est = ProgressEstimator(tiny_model(tok, seed=1)).eval()
    torch.nn.init.normal_(est.head.weight, std=0.5)
    trajs = [make_traj(0, ["go north", "take key"], 1.0), make_traj(1, ["open door"], 0.0, obs_len=4),
             make_traj(2, ["go west", "go east", "take key"], 1.0, obs_len=2)]
    views = [checked_view(tok, t, None) for t in trajs]
    batch = collate([{"input_ids": v.input_ids, "step_ends": v.step_ends, "outcome": 0.0} for v in views],
                    tok.pad_token_id)
    with torch.no_grad():
        together = est(batch["input_ids"], batch["attention_mask"], batch["step_ends"])
        for b, v in enumerate(views):
            alone = est(torch.tensor([v.input_ids]), torch.ones(1, len(v.input_ids), dtype=torch.long),
                        torch.tensor([v.step_ends]))
            assert torch.allclose(together[b, : len(v.step_ends)], alone[0], atol=1e-5)
            assert torch.all(together[b, len(v.step_ends):] == 0)
        # the value of step s is read at token step_ends[s]: the head applied to that hidden state
        v = views[2]
        hidden = est.backbone.model(input_ids=torch.tensor([v.input_ids])).last_hidden_state[0]
        manual = est.head(hidden[v.step_ends]).squeeze(-1)
        assert torch.allclose(manual, together[2, :3], atol=1e-5)
    annotate_progress(est, tok, trajs, batch_size=2)
    for b, t in enumerate(trajs):
        assert t.annotations["progress"] == pytest.approx(together[b, : t.num_steps].tolist(), abs=1e-5)


def test_truncated_steps_get_zero_and_are_reported(tok):
    est = ProgressEstimator(tiny_model(tok)).eval()
    torch.nn.init.constant_(est.head.bias, 0.25)
    short, long_ = make_traj(0, ["go north"], 1.0), make_traj(1, ["go north", "go south", "take key"], 1.0, obs_len=3)
    full = checked_view(tok, long_, None)
    limit = full.step_ends[0] + 2  # room for the first step only
    assert len(checked_view(tok, short, None).input_ids) <= limit
    report = annotate_progress(est, tok, [short, long_], max_length=limit)
    assert report == {"trajectories": 2, "cut_trajectories": 1, "cut_steps": 2}
    assert long_.annotations["progress"] == pytest.approx([0.25, 0.0, 0.0])
    assert long_.stats["progress_cut_steps"] == 2 and short.stats["progress_cut_steps"] == 0


def test_bad_input_names_the_trajectory(tok, monkeypatch):
    est = ProgressEstimator(tiny_model(tok))
    with pytest.raises(TrajectoryError, match="trajectory 5 .*zero steps"):
        annotate_progress(est, tok, [Trajectory(5, "t", [], 0.0, False)])
    with pytest.raises(TrajectoryError, match="trajectory 6 has a non-finite outcome"):
        fit_progress_estimator(ProgressConfig(), [make_traj(6, ["go north"], float("nan"))], tok,
                               tiny_model(tok), "/nonexistent/never-written")
    import rl.credit.progress as progress

    monkeypatch.setattr(progress, "tokenize_trajectory", lambda tk, t: TokenView([1, 2, 3], [0, 1, 0], [1], 1))
    with pytest.raises(TrajectoryError, match="trajectory 7: token view has 1 step ends for 2 steps"):
        annotate_progress(est, tok, [make_traj(7, ["go north", "go south"], 1.0)])


def test_fit_saves_best_atomically_and_reloads(tok, tmp_path):
    trajs = [make_traj(i, ["take key", "go north"][: 1 + i % 2], float(i % 2)) for i in range(12)]
    logged = []
    cfg = ProgressConfig(lr=1e-3, head_lr=1e-2, epochs=3, batch_size=4, val_fraction=0.25, patience=3)
    est = fit_progress_estimator(cfg, trajs, tok, tiny_model(tok), tmp_path / "est",
                                 log_fn=lambda m, step: logged.append(m))
    assert [m["progress/epoch"] for m in logged] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["est"]  # no .tmp / .old left behind
    assert (tmp_path / "est" / "head.safetensors").exists() and (tmp_path / "est" / "backbone" / "config.json").exists()
    assert json.loads((tmp_path / "est" / "estimator.json").read_text())["hidden_size"] == 64
    loaded = ProgressEstimator.load(tmp_path / "est")
    a, b = [make_traj(0, ["take key", "go north"], 1.0) for _ in range(2)]
    annotate_progress(est, tok, [a])
    annotate_progress(loaded, tok, [b])
    assert a.annotations["progress"] == pytest.approx(b.annotations["progress"], abs=1e-6)
    # the returned weights are those of the best validation epoch: re-evaluating gives its loss
    best = min(m["progress/val_loss"] for m in logged)
    val = [t for t in trajs if t.traj_id in _val_ids(len(trajs), 0.25, 0)]
    annotate_progress(est, tok, val)
    mse = np.mean([(sum(t.annotations["progress"]) - t.outcome) ** 2 for t in val])
    assert mse == pytest.approx(best, rel=1e-4, abs=1e-6)


def _val_ids(n, frac, seed):
    from rl.credit.progress import _split

    return set(_split(n, frac, seed)[1])


def test_early_stopping_after_patience(tok, tmp_path):
    trajs = [make_traj(i, ["go north"], float(i % 2)) for i in range(8)]
    logged = []
    cfg = ProgressConfig(lr=0.0, head_lr=0.0, epochs=10, batch_size=4, val_fraction=0.25, patience=2)
    fit_progress_estimator(cfg, trajs, tok, tiny_model(tok), tmp_path / "est", log_fn=lambda m, s: logged.append(m))
    # nothing can improve with lr = 0: epoch 0 is best, then `patience` stale epochs end the fit
    assert len(logged) == 3


def test_lora_fit_and_reload(tok, tmp_path):
    trajs = [make_traj(i, ["take key"], float(i % 2)) for i in range(6)]
    cfg = ProgressConfig(lr=1e-2, head_lr=1e-2, epochs=1, batch_size=3, val_fraction=0.0, lora=True, lora_r=4)
    est = fit_progress_estimator(cfg, trajs, tok, tiny_model(tok), tmp_path / "lora")
    assert hasattr(est.backbone, "peft_config")
    trainable = {n for n, p in est.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and not any("embed_tokens" in n for n in trainable)
    loaded = ProgressEstimator.load(tmp_path / "lora")
    a, b = make_traj(0, ["take key", "go north"], 1.0), make_traj(0, ["take key", "go north"], 1.0)
    annotate_progress(est, tok, [a])
    annotate_progress(loaded, tok, [b])
    assert a.annotations["progress"] == pytest.approx(b.annotations["progress"], abs=1e-5)


def test_heatmap_writes_png(tok, tmp_path):
    from rl.credit.plot import credit_heatmap

    trajs = [make_traj(0, ["go north", "take key"], 1.0), make_traj(1, ["open door"], 0.0)]
    for t in trajs:
        t.annotations["progress"] = [0.5] * t.num_steps
    credits = {m: step_rewards(trajs, CreditConfig(mode=m)) for m in ("terminal", "spa", "mc")}
    out = credit_heatmap(trajs, credits, tmp_path / "plots" / "h.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="trajectory 1 with 1 steps"):
        credit_heatmap(trajs, {"bad": [[0.0, 0.0], [0.0, 0.0]]}, tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------
# Learning test against ground truth (keydoor: only `take key` and `open door` make progress)


def _oracle(env):
    target = env.door if env.has_key else env.key
    dr, dc = target[0] - env.pos[0], target[1] - env.pos[1]
    if dr:
        return "go south" if dr > 0 else "go north"
    if dc:
        return "go east" if dc > 0 else "go west"
    return "open door" if env.has_key else "take key"


def keydoor_trajectories(n, seed, q_search=0.4, q_after=0.8):
    """Before the key the agent follows the oracle with prob q_search (else a random action) and
    gives up after a hidden budget of 3..12 turns; once it holds the key it follows the oracle
    with prob q_after and has time to finish. The outcome is thus decided by finding the key."""
    from envs import make_env
    from envs.keydoor import ACTIONS

    env = make_env("keydoor", size=3, max_steps=40, num_train_tasks=200, num_dev_tasks=0, num_test_tasks=0)
    rng, tasks, out = random.Random(seed), env.tasks("train"), []
    for i in range(n):
        obs, info = env.reset(tasks[i % len(tasks)])
        steps, done, prev, budget = [], False, 0.0, rng.randint(3, 12)
        while not done and (env.has_key or len(steps) < budget):
            action = _oracle(env) if rng.random() < (q_after if env.has_key else q_search) else rng.choice(ACTIONS)
            nxt, reward, done, info = env.step(action)
            steps.append(Step(obs, action, bool(info["valid"]), float(reward),
                              {"progress": info["progress"], "increment": info["progress"] - prev}))
            obs, prev = nxt, info["progress"]
        out.append(Trajectory(i, tasks[i % len(tasks)], steps, float(info["score"]), bool(info["won"]),
                              group_id=i % len(tasks)))
    return out


@pytest.mark.slow
def test_estimator_learns_progress_from_outcomes(tok, tmp_path):
    from scipy.stats import spearmanr

    torch.manual_seed(0)
    train, test = keydoor_trajectories(240, seed=0), keydoor_trajectories(120, seed=1)
    cfg = ProgressConfig(lr=3e-3, head_lr=3e-3, epochs=8, batch_size=8, max_length=1024, val_fraction=0.15,
                         patience=3, seed=0)
    est = fit_progress_estimator(cfg, train, tok, tiny_model(tok, seed=0), tmp_path / "est")
    annotate_progress(est, tok, test, batch_size=16)
    c = np.concatenate([t.annotations["progress"] for t in test])
    inc = np.array([s.info["increment"] for t in test for s in t.steps])
    cum = np.concatenate([np.cumsum(t.annotations["progress"]) for t in test])
    prog = np.array([s.info["progress"] for t in test for s in t.steps])
    mae = np.mean([abs(sum(t.annotations["progress"]) - t.outcome) for t in test])
    base = np.mean([abs(np.mean([t.outcome for t in train]) - t.outcome) for t in test])
    rho_cum, rho_inc = spearmanr(cum, prog).statistic, spearmanr(c, inc).statistic
    p = (inc > 0).mean()
    print(f"MAE {mae:.3f} (predict-the-mean {base:.3f}); Spearman cumulative {rho_cum:.3f}; "
          f"increments {rho_inc:.3f} (tie ceiling {np.sqrt(3 * p * (1 - p)):.3f})")
    assert mae <= 0.5 * base
    assert rho_cum >= 0.5
