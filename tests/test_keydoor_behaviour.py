"""benchmarks/keydoor_behaviour.py: episodes scripted through the real two-door KeyDoor env are
classified as the kind they were played as, retries at a jammed door are counted, and the table's
shares, recovery rate and paired row are the hand-computed numbers."""

import importlib.util
from pathlib import Path

import pytest

from envs import make_env
from rl.trajectory import Step, Trajectory, save_trajectories

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("keydoor_behaviour", ROOT / "benchmarks" / "keydoor_behaviour.py")
kb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kb)


def _walk(frm, to):
    (r0, c0), (r1, c1) = frm, to
    return (["go south"] * (r1 - r0) + ["go north"] * (r0 - r1) + ["go east"] * (c1 - c0)
            + ["go west"] * (c0 - c1))


def _play(env, task, plan) -> Trajectory:
    """Run `plan(env)` (a list of actions computed from the reset layout) as a Trajectory."""
    obs, _ = env.reset(task)
    steps, done, info = [], False, {}
    for action in plan(env):
        nxt, reward, done, info = env.step(action)
        steps.append(Step(observation=obs, action=action, valid=info["valid"], reward=reward, info=info))
        obs = nxt
        if done:
            break
    return Trajectory(traj_id=0, task=task, steps=steps, outcome=info["score"], success=bool(info["won"]))


def _key_then(env, *doors_and_opens):
    actions, pos = _walk(env.pos, env.key) + ["take key"], env.key
    for target, opens in doors_and_opens:
        actions += _walk(pos, target) + ["open door"] * opens
        pos = target
    return actions


@pytest.fixture(scope="module")
def env():
    return make_env("keydoor", size=4, doors=2, max_steps=40, num_train_tasks=8)


def _other(env):
    return next(c for c in env.door_cells if c != env.door)


def test_episode_kinds_and_retries_through_the_real_env(env):
    task = env.tasks("train")[0]
    recovered = _play(env, task, lambda e: _key_then(e, (_other(e), 3), (e.door, 1)))
    stuck = _play(env, task, lambda e: _key_then(e, (_other(e), 2)) + ["go north", "go south"] * 20)
    first = _play(env, task, lambda e: _key_then(e, (e.door, 1)))
    wander = _play(env, task, lambda e: _walk(e.pos, e.key) + ["take key"] + ["go north", "go south"] * 20)
    no_key = _play(env, task, lambda e: ["open door"] * 40)
    assert recovered.success and first.success and not stuck.success and not wander.success
    assert [kb.episode_kind(t) for t in (recovered, stuck, first, wander, no_key)] == [
        "jammed, recovered", "jammed, stuck", "first door", "no door tried", "no key"]
    # three opens at the jammed door: the first jams it, the other two are retries
    assert [kb.jammed_retries(t) for t in (recovered, stuck, first, wander, no_key)] == [2, 1, 0, 0, 0]

    b = kb.behaviour([recovered, stuck, first, wander])
    assert b["success"] == 0.5 and b["jammed, recovered"] == 0.25 and b["no key"] == 0.0
    assert b["recovery"] == 0.5 and b["retries per jammed"] == 1.5
    assert b["steps when won"] == (recovered.num_steps + first.num_steps) / 2


def test_table_reads_the_cells_and_pairs_recovery_with_terminal(env, tmp_path):
    task = env.tasks("train")[0]
    rec = _play(env, task, lambda e: _key_then(e, (_other(e), 1), (e.door, 1)))
    stuck = _play(env, task, lambda e: _key_then(e, (_other(e), 1)) + ["go north", "go south"] * 20)
    cells = {(0, "terminal"): [rec, stuck, stuck, stuck], (0, "mc"): [rec, rec, stuck, stuck],
             (1, "terminal"): [rec, stuck], (1, "mc"): [rec, rec]}
    for (seed, mode), trajs in cells.items():
        save_trajectories(trajs, tmp_path / f"s{seed}_{mode}" / "eval" / "trajectories_rl")
    save_trajectories([stuck, stuck], tmp_path / "s0_terminal" / "eval" / "trajectories_sft")
    data = kb.collect(tmp_path, [0, 1], ["terminal", "mc"])
    assert data[(0, "mc")]["recovery"] == 0.5 and data[(1, "terminal")]["recovery"] == 0.5
    assert data[(0, "sft")]["recovery"] == 0.0 and (1, "sft") not in data
    text = kb.table(data, [0, 1], ["terminal", "mc"])
    # recovery mc - terminal: seed 0 +25, seed 1 +50 points; mean 37.5, t_{0.975,1} * 17.68 / sqrt(2) = 158.8
    assert "| mc - terminal | +37.5 [-121.3, +196.3] (n=2) | +25 / +50 |" in text
    assert "| terminal | 2 | 38 |" in text  # success (25 + 50) / 2
