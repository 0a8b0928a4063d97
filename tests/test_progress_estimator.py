"""rl.credit.progress: loss, batching/gather invariance, truncation reporting, fit/save/load, early
stopping, LoRA, and a learning test against the keydoor env's ground-truth progress."""

import json
import random

import numpy as np
import pytest
import torch

from rl.credit import (ProgressConfig, ProgressEstimator, annotate_progress, checked_view, fit_progress_estimator,
                       progress_loss, step_rewards, CreditConfig)
from rl.credit.progress import _pad_id, collate
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
    import rl.credit.readout as readout

    monkeypatch.setattr(readout, "tokenize_trajectory", lambda tk, t: TokenView([1, 2, 3], [0, 1, 0], [1], 1))
    with pytest.raises(TrajectoryError, match="trajectory 7: token view has 1 step ends for 2 steps"):
        annotate_progress(est, tok, [make_traj(7, ["go north", "go south"], 1.0)])


def test_fit_saves_best_atomically_and_reloads(tok, tmp_path):
    trajs = [make_traj(i, ["take key", "go north"][: 1 + i % 2], float(i % 2)) for i in range(12)]
    logged = []
    cfg = ProgressConfig(lr=1e-3, head_lr=1e-2, epochs=3, batch_size=4, val_fraction=0.25, patience=3)
    est = fit_progress_estimator(cfg, trajs, tok, tiny_model(tok), tmp_path / "est",
                                 log_fn=lambda m, step: logged.append(m))
    assert [m["progress/epoch"] for m in logged[:3]] == [0, 1, 2]
    summary = logged[3]  # after the epochs: best loss, the constant predictor's loss, credit spread
    val_ids = _val_ids(len(trajs), 0.25, 0)
    train_mean = np.mean([t.outcome for t in trajs if t.traj_id not in val_ids])
    constant = np.mean([(train_mean - t.outcome) ** 2 for t in trajs if t.traj_id in val_ids])
    assert summary["progress/val_loss_constant"] == pytest.approx(constant)
    assert all(m["progress/val_loss_constant"] == pytest.approx(constant) for m in logged[:3])
    assert summary["progress/best_val_loss"] == min(m["progress/val_loss"] for m in logged[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["est"]  # no .tmp / .old left behind
    assert (tmp_path / "est" / "head.safetensors").exists() and (tmp_path / "est" / "backbone" / "config.json").exists()
    assert json.loads((tmp_path / "est" / "estimator.json").read_text())["hidden_size"] == 64
    loaded = ProgressEstimator.load(tmp_path / "est")
    a, b = [make_traj(0, ["take key", "go north"], 1.0) for _ in range(2)]
    annotate_progress(est, tok, [a])
    annotate_progress(loaded, tok, [b])
    assert a.annotations["progress"] == pytest.approx(b.annotations["progress"], abs=1e-6)
    # the returned weights are those of the best validation epoch: re-evaluating gives its loss
    best = min(m["progress/val_loss"] for m in logged[:3])
    val = [t for t in trajs if t.traj_id in val_ids]
    annotate_progress(est, tok, val)
    mse = np.mean([(sum(t.annotations["progress"]) - t.outcome) ** 2 for t in val])
    assert mse == pytest.approx(best, rel=1e-4, abs=1e-6)
    c = np.concatenate([t.annotations["progress"] for t in val])
    assert summary["progress/credit_cv"] == pytest.approx(c.std() / abs(c.mean()), rel=1e-4)


def test_credit_cv_and_constant_baseline_by_hand():
    from rl.credit.progress import constant_baseline_loss, credit_cv

    assert credit_cv([0.1, 0.1, 0.1]) == pytest.approx(0.0)  # uniform credit
    assert credit_cv([0.0, 0.5, 0.0, 0.5]) == pytest.approx(1.0)  # mean 0.25, std 0.25
    assert constant_baseline_loss([0.0, 1.0], [1.0, 0.5]) == pytest.approx((0.25 + 0.0) / 2)


def _val_ids(n, frac, seed):
    from rl.credit.progress import _split

    return set(_split(n, frac, seed)[1])


def test_early_stopping_after_patience(tok, tmp_path):
    trajs = [make_traj(i, ["go north"], float(i % 2)) for i in range(8)]
    logged = []
    cfg = ProgressConfig(lr=0.0, head_lr=0.0, epochs=10, batch_size=4, val_fraction=0.25, patience=2)
    fit_progress_estimator(cfg, trajs, tok, tiny_model(tok), tmp_path / "est", log_fn=lambda m, s: logged.append(m))
    # nothing can improve with lr = 0: epoch 0 is best, then `patience` stale epochs end the fit
    assert len([m for m in logged if "progress/epoch" in m]) == 3


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


def test_heatmap_rows_skip_undiscounted_mc_and_add_true_progress():
    from rl.credit.plot import heatmap_credits

    trajs = [make_traj(0, ["go north", "take key", "open door"], 1.0)]
    trajs[0].annotations["progress"] = [0.1, 0.4, 0.5]
    for step, p in zip(trajs[0].steps, (0.0, 0.5, 1.0)):
        step.info["progress"] = p
    rows = heatmap_credits(trajs, CreditConfig())
    assert list(rows) == ["terminal", "spa", "true Δprogress"]  # gamma 1: no mc row
    assert rows["terminal"] == [[0.0, 0.0, 1.0]]
    assert rows["true Δprogress"] == [[0.0, 0.5, 0.5]]
    rows = heatmap_credits(trajs, CreditConfig(gamma=0.5))
    # mc at gamma 0.5: G_t = 0.5^(T-t) R -> 0.25, 0.5, 1
    assert rows["mc (γ=0.5)"] == [pytest.approx([0.25, 0.5, 1.0])]
    for step in trajs[0].steps:  # an env without true progress: no truth row
        step.info.pop("progress")
    assert "true Δprogress" not in heatmap_credits(trajs, CreditConfig())


# ---------------------------------------------------------------------------------------------
# Learning test against ground truth. KeyDoor's outcome is the final progress (0.5 holding the key,
# 1 once the door is open), so R is exactly the sum of the true increments: `take key` +0.5,
# `open door` +0.5, `drop key` -0.5, everything else (moves, invalid attempts) 0.


def _oracle(env):
    target = env.door if env.has_key else env.key
    dr, dc = target[0] - env.pos[0], target[1] - env.pos[1]
    if dr:
        return "go south" if dr > 0 else "go north"
    if dc:
        return "go east" if dc > 0 else "go west"
    return "open door" if env.has_key else "take key"


def keydoor_trajectories(n, seed, split, p_random=0.15, p_drop=0.6, max_horizon=10, p_stop_event=0.3):
    """Episodes on a 2x2 KeyDoor ("train" and "test" splits share no layout) from a behaviour policy
    that makes progress-changing steps a large share of all steps (else Spearman against the tied
    ternary truth is capped low): with prob `p_random` a uniformly random action (so invalid take /
    drop / open attempts, worth 0, occur), else when holding the key `drop key` with prob `p_drop`,
    else the oracle. The episode ends when won, at a random horizon 1..`max_horizon`, or with prob
    `p_stop_event` right after a step that changed progress: episodes that end on an event pin its
    credit to that step (a later step could not carry it). Step.info holds the true increment."""
    from envs import make_env
    from envs.keydoor import ACTIONS

    env = make_env("keydoor", size=2, max_steps=50, num_train_tasks=16, num_dev_tasks=0, num_test_tasks=8)
    rng, tasks, out = random.Random(seed), env.tasks(split), []
    for i in range(n):
        task = tasks[rng.randrange(len(tasks))]
        obs, info = env.reset(task)
        steps, done, prev, horizon = [], False, 0.0, rng.randint(1, max_horizon)
        while not done and len(steps) < horizon:
            if rng.random() < p_random:
                action = rng.choice(ACTIONS)
            elif env.has_key and rng.random() < p_drop:
                action = "drop key"
            else:
                action = _oracle(env)
            nxt, reward, done, info = env.step(action)
            inc = info["progress"] - prev
            steps.append(Step(obs, action, bool(info["valid"]), float(reward),
                              {"progress": info["progress"], "increment": inc}))
            obs, prev = nxt, info["progress"]
            if inc != 0 and rng.random() < p_stop_event:
                break
        out.append(Trajectory(i, task, steps, float(info["score"]), bool(info["won"]),
                              system_prompt=env.system_prompt))
    return out


def max_spearman(truth):
    """Best Spearman any prediction can reach against tied `truth` (ties broken arbitrarily, the
    groups in the right order): sqrt(1 - sum_k p_k^3) for group shares p_k, up to O(1/n)."""
    from scipy.stats import spearmanr

    truth = np.asarray(truth, dtype=float)
    return spearmanr(truth, np.lexsort((np.arange(len(truth)), truth)).argsort()).statistic


def test_keydoor_generator_outcome_is_sum_of_increments():
    trajs = keydoor_trajectories(300, seed=5, split="train")
    for t in trajs:
        assert t.outcome == pytest.approx(sum(s.info["increment"] for s in t.steps))
        assert t.outcome in (0.0, 0.5, 1.0) and (t.outcome == 1.0) == t.success
    inc = np.array([s.info["increment"] for t in trajs for s in t.steps])
    assert set(inc) == {-0.5, 0.0, 0.5}
    shares = [(inc == v).mean() for v in (-0.5, 0.0, 0.5)]
    assert max_spearman(inc) == pytest.approx(np.sqrt(1 - sum(p**3 for p in shares)), abs=0.01)
    assert max_spearman([0] * 300 + [1] * 100) == pytest.approx(np.sqrt(3 * 0.25 * 0.75), abs=1e-3)


N_TRAIN, EPOCHS, DATA_SEED = 400, 16, 0  # ~85 s on one core
MAE_FRACTION = 0.5  # the fit must beat the predict-the-mean baseline's MAE by this factor


@pytest.mark.slow
def test_estimator_learns_progress_from_outcomes(tok, tmp_path):
    """Trained on outcomes alone, a tiny estimator's c_t rank held-out steps like the true increments
    (Spearman >= 0.8 over all steps of unseen layouts) and their sums match R."""
    from scipy.stats import spearmanr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = keydoor_trajectories(N_TRAIN, seed=DATA_SEED, split="train")
        test = keydoor_trajectories(200, seed=DATA_SEED + 1, split="test")
        cfg = ProgressConfig(lr=1e-3, head_lr=1e-3, epochs=EPOCHS, batch_size=8, max_length=1024, val_fraction=0.1,
                             patience=EPOCHS, seed=DATA_SEED)
        est = fit_progress_estimator(cfg, train, tok, tiny_model(tok, hidden=64, layers=2, seed=DATA_SEED), tmp_path / "est")
        annotate_progress(est, tok, test, batch_size=32)
    finally:
        torch.set_num_threads(threads)
    c = np.concatenate([t.annotations["progress"] for t in test])
    inc = np.array([s.info["increment"] for t in test for s in t.steps])
    rho, rho_max = spearmanr(c, inc).statistic, max_spearman(inc)
    mae = np.mean([abs(sum(t.annotations["progress"]) - t.outcome) for t in test])
    base = np.mean([abs(np.mean([t.outcome for t in train]) - t.outcome) for t in test])
    means = {v: round(float(c[inc == v].mean()), 3) for v in (-0.5, 0.0, 0.5)}
    print(f"Spearman {rho:.3f} (max {rho_max:.3f} for this tie pattern, {len(c)} steps); MAE |sum c - R| "
          f"{mae:.3f} (predict-the-mean {base:.3f}); mean c by true increment {means}")
    assert rho_max >= 0.85
    assert rho >= 0.8
    assert mae <= MAE_FRACTION * base
    # credit lands on the event's own step, with the right sign and about the right size
    assert means[0.5] > 0.3 and means[-0.5] < -0.3 and abs(means[0.0]) < 0.1


def test_micro_batches_give_the_same_gradients_as_whole_batches(tok, tmp_path, monkeypatch):
    """progress.micro_batch_size only bounds memory: the gradients of a batch's micro-batches add up
    to the batch mean's at every optimizer step, the short last batch included (11 trajectories in
    batches of 4: 4, 4, 3), and the fitted estimator is the same."""
    trajs = [make_traj(i, ["take key", "go north", "open door"][: 1 + i % 3], float(i % 2), obs_len=1 + i % 4)
             for i in range(11)]
    step = torch.optim.AdamW.step
    grads, fitted = {}, {}

    def recording_step(self, *a, **k):
        grads[micro].append(torch.cat([p.grad.flatten().clone() for g in self.param_groups for p in g["params"]
                                       if p.grad is not None]))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    for micro in (0, 2, 1):
        grads[micro] = []
        cfg = ProgressConfig(lr=1e-3, head_lr=1e-2, epochs=1, batch_size=4, micro_batch_size=micro,
                             val_fraction=0.0, patience=3, grad_clip=0.0)
        est = fit_progress_estimator(cfg, trajs, tok, tiny_model(tok), tmp_path / f"m{micro}")
        fitted[micro] = torch.cat([p.detach().flatten() for p in est.parameters()])
    assert len(grads[0]) == 3 and all(g.abs().max() > 0 for g in grads[0])
    for micro in (2, 1):
        assert len(grads[micro]) == 3
        for got, want in zip(grads[micro], grads[0]):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(fitted[micro], fitted[0], rtol=1e-3, atol=1e-5)
    # a batch shorter than batch_size is still its own mean: the gradient of the SPA loss over the
    # 3 trajectories, by hand at the initial weights
    short = trajs[:3]
    ref = ProgressEstimator(tiny_model(tok))
    batch = collate([{"input_ids": v.input_ids, "step_ends": v.step_ends, "outcome": t.outcome}
                     for t, v in ((t, checked_view(tok, t, None)) for t in short)], _pad_id(tok))
    c = ref(batch["input_ids"], batch["attention_mask"], batch["step_ends"])
    progress_loss(c, batch["step_mask"].float(), batch["outcome"]).backward()
    # in the optimizer's order: the backbone's group, then the head's
    params = [*ref.backbone.parameters(), *ref.head.parameters()]
    want = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    for micro in (0, 1):
        grads[micro] = []
        cfg = ProgressConfig(epochs=1, batch_size=4, micro_batch_size=micro, val_fraction=0.0, grad_clip=0.0)
        fit_progress_estimator(cfg, short, tok, tiny_model(tok), tmp_path / f"short{micro}")
        (got,) = grads[micro]
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="micro_batch_size"):
        ProgressConfig(batch_size=4, micro_batch_size=3).validate()
