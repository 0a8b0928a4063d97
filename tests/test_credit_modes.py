"""rl.credit.modes: every mode on hand-computed cases, invariants, bad input named by trajectory id."""

import math

import numpy as np
import pytest

from rl.credit import CREDIT_MODES, CreditConfig, gigpo_advantages, resolve_scorer, step_rewards
from rl.trajectory import Step, Trajectory, TrajectoryError


def traj(tid, outcome, actions=("a", "b", "c"), valid=None, obs=None, rewards=None, group=0, progress=None):
    n = len(actions)
    valid = valid if valid is not None else [True] * n
    obs = obs if obs is not None else [f"o{i}" for i in range(n)]
    rewards = rewards if rewards is not None else [0.0] * n
    steps = [Step(o, a, v, r) for o, a, v, r in zip(obs, actions, valid, rewards)]
    t = Trajectory(tid, f"task-{group}", steps, outcome, outcome > 0, group_id=group)
    if progress is not None:
        t.annotations["progress"] = list(progress)
    return t


def approx(got, expected):
    return all(len(g) == len(e) and np.allclose(g, e, atol=1e-6) for g, e in zip(got, expected)) and len(got) == len(expected)


def test_terminal_puts_R_on_last_step():
    got = step_rewards([traj(0, 1.0), traj(1, 0.0, actions=("x",)), traj(2, 0.3, actions=("x", "y"))],
                       CreditConfig(mode="terminal"))
    assert approx(got, [[0, 0, 1.0], [0.0], [0, 0.3]])


def test_terminal_invalid_penalty_hand_computed():
    t = traj(0, 1.0, valid=[False, True, False])
    got = step_rewards([t, traj(1, 0.5, actions=("x",))], CreditConfig(mode="terminal", invalid_penalty=0.1))
    assert approx(got, [[-0.1, 0.0, 1.0 - 0.1], [0.5]])
    assert approx(step_rewards([t], CreditConfig(mode="terminal")), [[0, 0, 1.0]])  # off by default


def test_invalid_penalty_bad_values_and_modes_fail_early():
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match="credit.invalid_penalty=.*must be a number >= 0"):
            CreditConfig(mode="terminal", invalid_penalty=bad).validate()
    with pytest.raises(ValueError, match="terminal, mc and gigpo only .*'spa'.*credit.beta"):
        CreditConfig(mode="spa", invalid_penalty=0.1).validate()
    for mode in ("terminal", "mc", "gigpo"):
        CreditConfig(mode=mode, invalid_penalty=0.1).validate()


def test_spa_hand_computed():
    t = traj(0, 1.0, valid=[True, False, True], progress=[0.2, -0.1, 0.9])
    got = step_rewards([t], CreditConfig(mode="spa", alpha=2.0, beta=0.5))
    # r_t = 2 c_t + 0.5 g_t
    assert approx(got, [[0.4 + 0.5, -0.2, 1.8 + 0.5]])
    got = step_rewards([t], CreditConfig(mode="spa", alpha=1.0, beta=0.0, spa_add_outcome=True))
    assert approx(got, [[0.2, -0.1, 0.9 + 1.0]])


def test_spa_with_a_perfect_estimator_sums_to_R():
    trajs = [traj(0, 1.0, progress=[0.5, 0.0, 0.5]), traj(1, 0.0, progress=[0.5, -0.5, 0.0]),
             traj(2, 0.7, actions=("x",), progress=[0.7])]
    got = step_rewards(trajs, CreditConfig(mode="spa", alpha=1.0, beta=0.0))
    assert [sum(r) for r in got] == pytest.approx([1.0, 0.0, 0.7])


def test_spa_without_progress_names_the_trajectory():
    with pytest.raises(TrajectoryError, match="trajectory 7 has no annotations\\['progress'\\]"):
        step_rewards([traj(7, 1.0)], CreditConfig(mode="spa"))
    with pytest.raises(TrajectoryError, match="trajectory 8.*non-finite"):
        step_rewards([traj(8, 1.0, progress=[0.1, math.nan, 0.2])], CreditConfig(mode="spa"))


def test_mc_hand_computed():
    t = traj(0, 1.0, rewards=[0.0, 0.5, 0.0])
    got = step_rewards([t], CreditConfig(mode="mc", gamma=0.5))
    assert approx(got, [[0.25, 0.5, 1.0]])  # G_t = 0.5^(2-t) * 1
    got = step_rewards([t], CreditConfig(mode="mc", gamma=0.5, mc_env_rewards=True))
    # u = [0, 0.5, 1]: G_2 = 1, G_1 = 0.5 + 0.5 = 1, G_0 = 0 + 0.5 * 1 = 0.5
    assert approx(got, [[0.5, 1.0, 1.0]])


def test_mc_gamma_one_first_step_is_R_and_terminal_sums_to_R():
    trajs = [traj(i, r, actions=tuple("abcd"[: i + 1])) for i, r in enumerate([1.0, 0.0, 0.4, 0.9])]
    mc = step_rewards(trajs, CreditConfig(mode="mc", gamma=1.0))
    term = step_rewards(trajs, CreditConfig(mode="terminal"))
    for t, g, r in zip(trajs, mc, term):
        assert g[0] == pytest.approx(t.outcome) and g == pytest.approx([t.outcome] * t.num_steps)
        assert sum(r) == pytest.approx(t.outcome)


def test_gigpo_hand_computed_without_std():
    # group 0: two rollouts that share the first observation "start" (anchor state);
    # group 1: a lone rollout that also saw "start" (other task: not compared).
    a = traj(0, 1.0, actions=("x", "y"), obs=["start", "mid"], group=0)
    b = traj(1, 0.0, actions=("z",), obs=["  START "], group=0)
    c = traj(2, 0.5, actions=("x",), obs=["start"], group=1)
    cfg = CreditConfig(mode="gigpo", gamma=0.5, gigpo_step_weight=2.0, gigpo_normalize_std=False)
    got = step_rewards([a, b, c], cfg)
    # returns: a = [0.5, 1.0], b = [0.0], c = [0.5]; episode: A^E = R - mean_group R = [0.5, -0.5, 0]
    # anchor "start" in group 0 holds G = {0.5 (a), 0.0 (b)}: A^S = [0.25, -0.25]; "mid" alone: 0
    assert approx(got, [[0.5 + 2 * 0.25, 0.5 + 0.0], [-0.5 - 2 * 0.25], [0.0]])


def test_gigpo_std_normalised():
    R = np.array([1.0, 0.0, 0.0])
    returns = [np.array([1.0]), np.array([0.0]), np.array([0.0])]
    anchors = [["s"], ["s"], ["s"]]
    got = gigpo_advantages(returns, R, [0, 0, 0], anchors, step_weight=0.5, normalize_std=True, eps=0.0)
    std = np.std([1.0, 0.0, 0.0], ddof=1)  # 0.57735
    adv = (R - 1 / 3) / std
    assert np.allclose(np.concatenate(got), adv + 0.5 * adv)


def test_gigpo_groups_by_the_envs_state_key_where_it_reports_one():
    # both rollouts stand in state "S" at step 0 and b stands in it again at step 1, after a refused move
    # whose feedback made its observation differ; the state key puts all three visits in one group
    a = traj(0, 1.0, actions=("good",), obs=["Now: S"], group=0)
    b = traj(1, 0.0, actions=("bad", "bad"), valid=[False, False], obs=["Now: S", "Nothing happens.\nNow: S"], group=0)
    for t in (a, b):
        for s in t.steps:
            s.info["state_before"] = "S"
    cfg = CreditConfig(mode="gigpo", gamma=0.5, gigpo_step_weight=1.0, gigpo_normalize_std=False)
    got = step_rewards([a, b], cfg)
    # returns a = [1], b = [0, 0]; A^E = [0.5, -0.5]; group "S" holds {1, 0, 0}: mean 1/3
    assert approx(got, [[0.5 + 2 / 3], [-0.5 - 1 / 3, -0.5 - 1 / 3]])
    for s in b.steps:  # without the key the refused move's observation is an anchor of its own: A^S = 0
        del s.info["state_before"]
    for s in a.steps:
        del s.info["state_before"]
    assert approx(step_rewards([a, b], cfg), [[0.5 + 0.5], [-0.5 - 0.5, -0.5]])


def test_gigpo_invalid_penalty_enters_the_step_returns_only():
    # a refused move and the valid move after it share state "S" (the refusal leaves the state as it was)
    a = traj(0, 1.0, actions=("bad", "good"), valid=[False, True], obs=["S", "S"], group=0)
    b = traj(1, 0.0, actions=("other",), obs=["S"], group=0)
    cfg = CreditConfig(mode="gigpo", gamma=1.0, gigpo_step_weight=1.0, gigpo_normalize_std=False, invalid_penalty=0.2)
    # returns: a = [1 - 0.2, 1], b = [0]; A^E = R - mean R = [0.5, -0.5] (outcomes unpenalised)
    # group "S" holds {0.8, 1.0, 0.0}: mean 0.6, so A^S = [0.2, 0.4, -0.6]
    assert approx(step_rewards([a, b], cfg), [[0.5 + 0.2, 0.5 + 0.4], [-0.5 - 0.6]])
    # mc: the penalty is in u_k, so in every return before it
    assert approx(step_rewards([a], CreditConfig(mode="mc", gamma=0.5, invalid_penalty=0.2)), [[-0.2 + 0.5, 1.0]])


def my_scorer(t):
    return [0.1 * (i + 1) for i in range(t.num_steps)]


def test_prm_scorer_callable_and_string():
    t = traj(0, 1.0)
    got = step_rewards([t], CreditConfig(mode="prm"), scorer=my_scorer)
    assert approx(got, [[0.1, 0.2, 0.3]])
    cfg = CreditConfig(mode="prm", prm_scorer="tests.test_credit_modes:my_scorer", prm_add_outcome=True)
    assert approx(step_rewards([t], cfg), [[0.1, 0.2, 1.3]])
    assert resolve_scorer("tests.test_credit_modes:my_scorer")(t) == pytest.approx([0.1, 0.2, 0.3])


def test_prm_bad_scorer_output_names_trajectory():
    with pytest.raises(TrajectoryError, match="trajectory 3.*2 scores for 3 steps"):
        step_rewards([traj(3, 1.0)], CreditConfig(mode="prm"), scorer=lambda t: [0.0, 1.0])
    with pytest.raises(ValueError, match="no callable 'nope'"):
        resolve_scorer("tests.test_credit_modes:nope")
    with pytest.raises(ValueError, match="prm_scorer"):
        step_rewards([traj(3, 1.0)], CreditConfig(mode="prm"))


def test_bad_mode_lists_allowed():
    with pytest.raises(ValueError, match="'magic'.*gigpo.*mc.*prm.*spa.*terminal"):
        step_rewards([traj(0, 1.0)], CreditConfig(mode="magic"))
    assert sorted(CREDIT_MODES) == ["gigpo", "mc", "prm", "spa", "terminal"]


@pytest.mark.parametrize("mode", sorted(CREDIT_MODES))
def test_bad_trajectories_rejected_by_every_mode(mode):
    cfg = CreditConfig(mode=mode)
    scorer = my_scorer
    good = traj(0, 1.0, progress=[0.0, 0.0, 1.0])
    empty = Trajectory(41, "t", [], 0.0, False)
    with pytest.raises(TrajectoryError, match="trajectory 41 .*zero steps"):
        step_rewards([good, empty], cfg, scorer=scorer)
    with pytest.raises(TrajectoryError, match="trajectory 42 .*non-finite outcome"):
        step_rewards([good, traj(42, math.nan, progress=[0, 0, 0])], cfg, scorer=scorer)
    with pytest.raises(TrajectoryError, match="trajectory 43 step 1 .*non-finite reward"):
        step_rewards([traj(43, 1.0, rewards=[0, math.inf, 0], progress=[0, 0, 0])], cfg, scorer=scorer)
    with pytest.raises(TrajectoryError, match="trajectory 44: annotation 'progress' has 2 values for 3 steps"):
        step_rewards([traj(44, 1.0, progress=[0.1, 0.2])], cfg, scorer=scorer)


def test_config_validate():
    with pytest.raises(ValueError, match="gamma"):
        CreditConfig(mode="mc", gamma=1.5).validate()
    with pytest.raises(ValueError, match="credit.mode='x'"):
        CreditConfig(mode="x").validate()
