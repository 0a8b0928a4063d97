"""Invariants shared by the four LMRL-Gym envs, checked under random play (not just the expert)."""

import random

import pytest

from envs import make_env

ENVS = {
    "maze": {"maze": "all", "num_train_tasks": 40, "num_dev_tasks": 0, "num_test_tasks": 0},
    "textnav": {"num_train_tasks": 40, "num_dev_tasks": 0, "num_test_tasks": 0},
    "wordle": {"num_train_tasks": 40, "num_dev_tasks": 0, "num_test_tasks": 0},
    "twenty_questions": {"num_train_tasks": 40, "num_dev_tasks": 0, "num_test_tasks": 0},
}


@pytest.mark.parametrize("name", sorted(ENVS))
def test_random_play_keeps_score_equal_to_progress_and_wins_only_at_one(name):
    env = make_env(name, **ENVS[name])
    tasks = env.tasks("train")
    # candidate replies: every expert action of every task (legal somewhere) plus junk
    pool = sorted({a for t in tasks for a in env.expert_actions(t)}) + ["", "hello there", "zzzzz", "go up"]
    rng = random.Random(0)
    wins = invalid = steps = 0
    for task in tasks:
        for _ in range(5):
            _, info = env.reset(task)
            assert info["progress"] == 0.0 and not info["won"]
            done, prev, total = False, 0.0, 0.0
            while not done:
                _, reward, done, info = env.step(rng.choice(pool))
                steps += 1
                invalid += not info["valid"]
                assert 0.0 <= info["score"] <= 1.0 and info["score"] == info["progress"]
                assert info["won"] == (info["progress"] == 1.0) == (reward == 1.0)
                if not info["valid"]:
                    assert info["progress"] == prev  # an invalid step changes nothing
                total += info["progress"] - prev
                prev = info["progress"]
            assert total == pytest.approx(info["score"])  # the outcome is the sum of the increments
            wins += info["won"]
    assert 0 < invalid < steps and wins < 200 * 0.5  # random play is mostly invalid-prone and mostly loses
