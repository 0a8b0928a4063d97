"""rl.credit.faithfulness (credit vs the env's true progress) and rl.credit.readout (where c_t is
read), on hand-built trajectories with known increments."""

import numpy as np
import pytest
import torch

from rl.credit.faithfulness import (average_ranks, event_auc, faithfulness, spearman, spearman_ceiling,
                                    top_step_hit, trajectory_faithfulness, trajectory_increments, true_increments)
from rl.credit.readout import observation_read_positions, read_view, truncate_reads
from rl.trajectory import Step, Trajectory

# Three KeyDoor-like episodes: progress after each step (0.5 holding the key, 1.0 door open).
#   won:   go, go, take key (+0.5), go, open door (+0.5)
#   won:   take key (+0.5), go, go, go, go, open door (+0.5)
#   lost:  go, take key (+0.5), drop key (-0.5), go
PROGRESS = [[0, 0, 0.5, 0.5, 1.0], [0.5, 0.5, 0.5, 0.5, 0.5, 1.0], [0, 0.5, 0, 0]]
INCREMENTS = [[0, 0, 0.5, 0, 0.5], [0.5, 0, 0, 0, 0, 0.5], [0, 0.5, -0.5, 0]]
WON = [True, True, False]


def episode(tid, progress, won):
    steps = [Step(f"obs {tid}.{t}", f"act {t}", True, info={"progress": p}) for t, p in enumerate(progress)]
    return Trajectory(tid, "t", steps, float(progress[-1]), won, final_observation=f"final {tid}")


def ramp(n):
    """A length penalty: credit falling with the step index (what the action-end estimator learnt)."""
    return list(0.3 - 0.07 * np.arange(n))


def test_true_increments_by_hand():
    assert true_increments([0, 0.5, 0.5, 1.0]).tolist() == [0, 0.5, 0, 0.5]
    assert true_increments([0.5, 0.0, 0.0]).tolist() == [0.5, -0.5, 0]
    # an unparsable reply (no progress in its info) changes nothing: carried forward
    assert true_increments([0.5, None, 1.0]).tolist() == [0.5, 0, 0.5]
    assert true_increments([None, 0.5], start=0.5).tolist() == [0, 0]
    for p, d in zip(PROGRESS, INCREMENTS):
        assert trajectory_increments(episode(0, p, True)).tolist() == d
    assert trajectory_increments(Trajectory(0, "t", [Step("o", "a", True, info={"valid": True})], 0.0, False)) is None


def test_ranks_and_spearman_match_scipy_with_ties():
    from scipy.stats import rankdata, spearmanr

    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, 50).astype(float), rng.normal(size=50)
    assert average_ranks(x) == pytest.approx(rankdata(x))
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert np.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_oracle_scores_one_and_ramp_scores_low():
    oracle = faithfulness(INCREMENTS, INCREMENTS, WON)
    assert oracle["spearman_true"] == pytest.approx(1.0)
    assert oracle["event_auc"] == 1.0 and oracle["top_step_hit"] == 1.0
    assert oracle["faithful_steps"] == 15 and oracle["faithful_won"] == 2
    bad = faithfulness([ramp(len(d)) for d in INCREMENTS], INCREMENTS, WON)
    # the ramp's top step is always step 0: a progress event only in the second won episode
    assert bad["top_step_hit"] == pytest.approx(0.5)
    # pooled, the ramp's ranks have almost nothing to do with the increments
    c = np.concatenate([ramp(len(d)) for d in INCREMENTS])
    d = np.concatenate(INCREMENTS)
    assert bad["spearman_true"] == pytest.approx(spearman(c, d)) and abs(bad["spearman_true"]) < 0.2
    # events get c = 0.16, 0.02, 0.3, -0.05, 0.23; the 9 idle steps 0.3 0.23 0.09 | 0.23 0.16 0.09
    # 0.02 | 0.3 0.09. Idle steps below each event (ties count 1/2): 4.5, 0.5, 8, 0, 6
    assert bad["event_auc"] == pytest.approx((4.5 + 0.5 + 8 + 0 + 6) / (5 * 9))


def test_ceiling_of_tied_truth():
    d = np.array([0.0] * 8 + [0.5] * 2)
    # a strictly increasing credit that puts both events on top reaches the ceiling, not 1
    top = np.arange(10.0)
    assert spearman(top, d) == pytest.approx(spearman_ceiling(d))
    assert spearman_ceiling(d) == pytest.approx(np.sqrt(1 - 0.8**3 - 0.2**3), abs=0.03)
    assert faithfulness([top], [d], [True])["spearman_true_max"] == pytest.approx(spearman_ceiling(d))


def test_top_step_hit_and_auc_by_hand():
    assert top_step_hit([[0.1, 0.9, 0.2], [0.5, 0.5, 0.1]], [[0, 0.5, 0], [0, 0.5, 0]]) == 0.5  # ties: first
    assert event_auc([0.3, 0.1, 0.2], [0.5, 0, 0]) == 1.0
    assert event_auc([0.1, 0.1, 0.2], [0.5, 0, 0]) == pytest.approx(0.25)  # 1 tie (1/2) + 1 loss over 2 pairs
    assert np.isnan(event_auc([0.1, 0.2], [0, 0]))


def test_trajectory_faithfulness_skips_envs_without_progress():
    trajs = [episode(i, p, w) for i, (p, w) in enumerate(zip(PROGRESS, WON))]
    assert trajectory_faithfulness(trajs, INCREMENTS)["spearman_true"] == pytest.approx(1.0)
    plain = [Trajectory(0, "t", [Step("o", "a", True)], 1.0, True)]
    assert trajectory_faithfulness(plain, [[0.3]]) == {}
    # mixed: only the trajectory with progress counts
    mixed = trajectory_faithfulness(plain + trajs[:1], [[9.0], INCREMENTS[0]])
    assert mixed["faithful_steps"] == 5 and mixed["top_step_hit"] == 1.0
    with pytest.raises(ValueError, match="trajectory 0: 2 credits for 5 increments"):
        faithfulness([[0.0, 1.0]], [INCREMENTS[0]], [True])


# ---------------------------------------------------------------------------------------------
# Reading positions


def test_observation_read_positions_by_hand():
    # tokens: p p A A o o g A A o g    (p prompt, A action, o observation, g generation prompt)
    mask = [0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0]
    assert observation_read_positions(mask, [3, 8], 11) == [6, 10]
    # an action with no generated token reads right before where it would start
    assert observation_read_positions([0, 1, 0, 0], [1, 3], 4) == [3, 3]
    view = truncate_reads(list(range(11)), [6, 10], 8)
    assert (view.input_ids, view.read_pos, view.num_steps) == (list(range(7)), [6], 1)


@pytest.fixture(scope="module")
def tok():
    from rl.models import load_tokenizer

    return load_tokenizer("tiny")


def test_read_view_sees_the_reply_to_each_action(tok):
    traj = Trajectory(3, "t", [Step("The key is here.", "take key", True), Step("You took the key.", "open door", True)],
                      1.0, True, system_prompt="Open the door.", final_observation="You opened the door. You won.")
    act = read_view(tok, traj, "action", None)
    obs = read_view(tok, traj, "observation", None)
    assert act.num_steps == obs.num_steps == 2
    decode = lambda v, t: tok.decode(v.input_ids[: v.read_pos[t] + 1])  # noqa: E731 - text seen by c_t
    assert "You took the key." not in decode(act, 0)
    assert "You took the key." in decode(obs, 0) and "open door" not in decode(obs, 0)
    assert "You won." in decode(obs, 1) and obs.read_pos[1] == len(obs.input_ids) - 1
    # reading at the observation is the position right before the next action's first token
    nxt = tok("open door", add_special_tokens=False)["input_ids"]
    assert obs.input_ids[obs.read_pos[0] + 1 : obs.read_pos[0] + 1 + len(nxt)] == nxt
    with pytest.raises(ValueError, match="progress.read_at='middle'"):
        read_view(tok, traj, "middle", None)


def test_estimator_reads_at_the_observation_and_keeps_it_on_disk(tok, tmp_path):
    from rl.credit import ProgressEstimator, annotate_progress
    from rl.models import tiny_model

    traj = Trajectory(3, "t", [Step("The key is here.", "take key", True), Step("You took the key.", "open door", True)],
                      1.0, True, system_prompt="Open the door.", final_observation="You opened the door. You won.")
    est = ProgressEstimator(tiny_model(tok, seed=2), read_at="observation").eval()
    torch.nn.init.normal_(est.head.weight, std=0.5)
    view = read_view(tok, traj, "observation", None)
    with torch.no_grad():
        hidden = est.backbone.model(input_ids=torch.tensor([view.input_ids])).last_hidden_state[0]
        manual = est.head(hidden[view.read_pos]).squeeze(-1).tolist()
    annotate_progress(est, tok, [traj])
    assert traj.annotations["progress"] == pytest.approx(manual, abs=1e-5)
    loaded = ProgressEstimator.load(est.save(tmp_path / "est"))
    assert loaded.read_at == "observation"
    annotate_progress(loaded, tok, [traj])
    assert traj.annotations["progress"] == pytest.approx(manual, abs=1e-5)


def test_fit_logs_faithfulness_only_when_the_env_reports_progress(tok, tmp_path):
    from rl.credit import ProgressConfig, fit_progress_estimator
    from rl.models import tiny_model

    trajs = [episode(i, PROGRESS[i % 3], WON[i % 3]) for i in range(12)]
    cfg = ProgressConfig(epochs=1, batch_size=4, val_fraction=0.25, read_at="observation")
    logged = []
    fit_progress_estimator(cfg, trajs, tok, tiny_model(tok), tmp_path / "a", log_fn=lambda m, s: logged.append(m))
    summary = logged[-1]
    assert -1.0 <= summary["progress/spearman_true"] <= 1.0 and 0.0 <= summary["progress/event_auc"] <= 1.0
    assert summary["progress/faithful_steps"] > 0 and "progress/top_step_hit" in summary
    for t in trajs:
        for s in t.steps:
            s.info = {}
    logged.clear()
    fit_progress_estimator(cfg, trajs, tok, tiny_model(tok), tmp_path / "b", log_fn=lambda m, s: logged.append(m))
    assert "progress/credit_cv" in logged[-1] and not any("spearman" in k for k in logged[-1])


def test_state_reading_telescopes_a_potential_of_each_observation(tok):
    from rl.credit import ProgressEstimator, annotate_progress
    from rl.credit.progress import _item, collate
    from rl.models import tiny_model

    trajs = [episode(i, p, w) for i, (p, w) in enumerate(zip(PROGRESS, WON))]
    est = ProgressEstimator(tiny_model(tok, seed=4), read_at="state").eval()
    torch.nn.init.normal_(est.head.weight, std=0.5)
    views = [read_view(tok, t, "state", None) for t in trajs]
    assert [len(v.obs_ids) for v in views] == [6, 7, 5]  # S + 1 observations, the final one included
    batch = collate([_item(v, t) for v, t in zip(views, trajs)], 0)
    distinct = {tuple(o) for v in views for o in v.obs_ids}
    assert batch["input_ids"].shape[0] == len(distinct) and batch["step_ends"].shape == (3, 7)
    assert batch["step_mask"].tolist()[2] == [1, 1, 1, 1, 0, 0]
    with torch.no_grad():
        c = est(batch["input_ids"], batch["attention_mask"], batch["step_ends"])

        def phi(text):  # the potential of one observation, encoded alone
            from rl.trajectory import encode_conversation

            ids = encode_conversation(tok, "", [text], [], add_generation_prompt=True).input_ids
            return est.head(est.backbone.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]).item()

        for b, t in enumerate(trajs):
            obs = [s.observation for s in t.steps] + [t.final_observation]
            manual = [phi(obs[k + 1]) - phi(obs[k]) for k in range(t.num_steps)]
            assert c[b, : t.num_steps].tolist() == pytest.approx(manual, abs=1e-4)
            assert c[b, t.num_steps:].abs().sum() == 0
            assert c[b].sum().item() == pytest.approx(phi(obs[-1]) - phi(obs[0]), abs=1e-4)
    annotate_progress(est, tok, trajs)
    assert trajs[1].annotations["progress"] == pytest.approx(c[1, :6].tolist(), abs=1e-5)


def test_state_batch_encodes_a_repeated_observation_once_with_the_same_gradient(tok):
    """KeyDoor revisits the same observation often: the batch holds each distinct one once, and
    the loss and its gradient equal those of the batch with one row per (trajectory, observation)."""
    from rl.credit import ProgressEstimator
    from rl.credit.progress import _item, collate, progress_loss
    from rl.models import tiny_model

    a, b, c = "You walk north. The key is here.", "You took the key. The door is 1 step east.", "You won."
    trajs = [Trajectory(0, "t", [Step(a, "take key", True), Step(b, "go east", True)], 0.5, False,
                        final_observation=c),
             Trajectory(1, "t", [Step(b, "go west", True)], 1.0, True, final_observation=a)]
    views = [read_view(tok, t, "state", None) for t in trajs]
    batch = collate([_item(v, t) for v, t in zip(views, trajs)], 0)
    assert batch["input_ids"].shape[0] == 3  # a, b and c, though a and b appear twice each
    assert batch["step_ends"].tolist() == [[0, 1, 2], [1, 0, -1]]

    def loss_and_grads(ids, attn, rows):
        est = ProgressEstimator(tiny_model(tok, seed=3), read_at="state")
        torch.nn.init.normal_(est.head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
        c = est(ids, attn, rows)
        loss = progress_loss(c, batch["step_mask"].float(), batch["outcome"])
        loss.backward()
        return loss.item(), [p.grad.clone() for p in est.parameters() if p.grad is not None]

    # the undeduplicated batch: one row per (trajectory, observation), built by hand
    seqs = [o for v in views for o in v.obs_ids]
    L = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    rows = torch.tensor([[0, 1, 2], [3, 4, -1]])
    got, want = loss_and_grads(batch["input_ids"], batch["attention_mask"], batch["step_ends"]), \
        loss_and_grads(ids, attn, rows)
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert max(w.abs().max().item() for w in want[1]) > 1e-2  # a gradient worth comparing
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-3)  # float sums in another order


def cut_oracle_keydoor(n, seed):
    """2x2 KeyDoor episodes of the oracle cut at a random horizon of 1..6 steps: R is the progress
    where the episode stops, so the ends identify each state's progress. (All three readings reach
    the ceiling on these; on the quickstart's explorations, which never end between walking onto
    the key and taking it, only `state` does: see the README.)"""
    import random

    from envs import make_env

    env = make_env("keydoor", size=2, max_steps=20, num_train_tasks=12, num_dev_tasks=0, num_test_tasks=0)
    rng, out = random.Random(seed), []
    for i in range(n):
        task = env.tasks("train")[rng.randrange(12)]
        obs, _ = env.reset(task)
        steps, horizon = [], rng.randint(1, 6)
        for action in env.expert_actions(task)[:horizon]:
            nxt, _, done, info = env.step(action)
            steps.append(Step(obs, action, True, info={"progress": info["progress"]}))
            obs = nxt
        out.append(Trajectory(i, task, steps, float(info["score"]), bool(info["won"]), system_prompt=env.system_prompt,
                              final_observation=obs))
    return out


@pytest.mark.slow
def test_state_reading_learns_progress_from_where_episodes_end(tok, tmp_path):
    from rl.credit import ProgressConfig, fit_progress_estimator, predict_progress
    from rl.models import tiny_model

    train, test = cut_oracle_keydoor(160, seed=0), cut_oracle_keydoor(60, seed=1)
    cfg = ProgressConfig(lr=1e-3, head_lr=1e-3, epochs=6, batch_size=8, val_fraction=0.1, patience=6,
                         read_at="state")
    est = fit_progress_estimator(cfg, train, tok, tiny_model(tok, hidden=64, layers=2, seed=0), tmp_path / "est")
    m = trajectory_faithfulness(test, predict_progress(est, tok, test))
    print(m)
    assert m["top_step_hit"] >= 0.9 and m["event_auc"] >= 0.95
    assert m["spearman_true"] >= 0.9 * m["spearman_true_max"]
