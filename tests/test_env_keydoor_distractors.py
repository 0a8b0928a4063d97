"""KeyDoor's `distractors` option: objects that can be taken but never change progress; the
default (0) behaves exactly as before."""

import random

import pytest

from envs import EnvError, check_env, make_env
from envs.keydoor import ACTIONS


def test_distractors_are_described_takeable_and_worth_nothing():
    env = make_env("keydoor", size=3, distractors=2, num_train_tasks=30, num_dev_tasks=5, num_test_tasks=5)
    check_env(env, "train", max_tasks=30)
    env.reset("train-0")
    layout = env._layouts["train-0"]
    agent, key, door, coin, lamp = layout
    assert len(set(layout)) == 5 and env.objects == {"coin": coin, "lamp": lamp}
    obs = env._observe()
    assert "The coin is" in obs and "The lamp is" in obs and "The book" not in obs
    assert "they do not help" in env.system_prompt
    # walk onto the coin and take it: valid, no progress, and it is no longer described
    env.pos = coin
    obs, reward, done, info = env.step("take coin")
    assert info["valid"] and info["progress"] == 0.0 and reward == 0.0 and not done
    assert obs.startswith("You took the coin.") and "The coin is" not in obs and "The lamp is" in obs
    _, _, _, info = env.step("take coin")
    assert not info["valid"]  # held already
    _, _, _, info = env.step("take book")
    assert not info["valid"]  # there is no book with 2 distractors
    # the oracle ignores the distractors and still wins with +0.5, +0.5
    env.reset("train-1")
    prev = 0.0
    for action in env.expert_actions("train-1"):
        _, _, done, info = env.step(action)
        assert info["progress"] - prev == (0.5 if action in ("take key", "open door") else 0.0)
        prev = info["progress"]
    assert done and info["won"]


def test_default_is_unchanged_by_the_option():
    plain = make_env("keydoor", size=3, num_train_tasks=40, num_dev_tasks=5, num_test_tasks=5)
    zero = make_env("keydoor", size=3, distractors=0, num_train_tasks=40, num_dev_tasks=5, num_test_tasks=5)
    assert plain._layouts == zero._layouts and plain.system_prompt == zero.system_prompt
    assert all(len(v) == 3 for v in plain._layouts.values())  # agent, key, door: no extra cells drawn
    rng = random.Random(0)
    for task in plain.tasks("train")[:10]:
        assert plain.reset(task) == zero.reset(task)
        for _ in range(10):
            action = rng.choice(ACTIONS + ("take coin",))
            a, b = plain.step(action), zero.step(action)
            assert a == b and "The coin" not in a[0]
            if a[2]:
                break


def test_bad_distractor_counts_fail_early():
    with pytest.raises(EnvError, match="env.distractors=5"):
        make_env("keydoor", size=3, distractors=5)
    with pytest.raises(EnvError, match="env.distractors=3"):
        make_env("keydoor", size=2, distractors=3)
