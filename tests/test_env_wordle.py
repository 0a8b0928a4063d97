import math
from collections import Counter

import pytest

from envs import EnvError, check_env, make_env
from envs.wordle import WORDS, feedback, parse_action

N = len(WORDS)


def _env(**kw):
    return make_env("wordle", **{"num_train_tasks": 300, "num_dev_tasks": 82, "num_test_tasks": 100, **kw})


def test_word_list_is_clean():
    assert N == 482 and len(set(WORDS)) == N and all(len(w) == 5 and w.isalpha() and w.islower() for w in WORDS)


def test_expert_wins_every_shipped_word_within_four_guesses():
    env = _env()
    for split in ("train", "dev", "test"):
        check_env(env, split, max_tasks=len(env.tasks(split)))  # every secret: 300 + 82 + 100 = all 482
    lengths = Counter(len(env.expert_actions(t)) for s in ("train", "dev", "test") for t in env.tasks(s))
    assert sum(lengths.values()) == N and max(lengths) <= 4 and lengths[3] > N / 2


@pytest.mark.parametrize("guess,secret,expected", [
    ("lemon", "melon", "ygygg"), ("eerie", "there", "ybybg"), ("arise", "eager", "yybby"),
    ("eager", "eager", "ggggg"), ("spool", "sport", "gggbb"), ("allow", "local", "yyyyb"),
])
def test_feedback_repeated_letters(guess, secret, expected):
    assert feedback(guess, secret) == expected


def test_observations_and_progress_by_hand():
    env = _env()
    task = next(t for t, w in env._tasks.items() if w == "eager")
    obs, info = env.reset(task)
    assert obs == "Guess the word. 6 guesses left." and info["progress"] == 0.0
    obs, reward, done, info = env.step("arise")
    consistent = [w for w in WORDS if feedback("arise", w) == "yybby"]  # brute force, not the env's cache
    assert obs == "arise: yybby. 5 guesses left." and info["candidates"] == len(consistent)
    assert info["progress"] == pytest.approx(math.log2(N / len(consistent)) / (math.log2(N) + 1))
    obs, _, _, info2 = env.step("arise")  # a repeated guess teaches nothing
    assert info2["progress"] == info["progress"] and info2["guesses"] == 2
    obs, reward, done, info = env.step("Eager.")
    assert obs == "eager: ggggg. You won." and done and reward == 1.0 and info["won"] and info["score"] == 1.0


def test_illegal_and_malformed_guesses_are_invalid_and_cost_no_guess():
    env = _env(max_guesses=2, max_steps=4)
    env.reset("train-0")
    obs, _, done, info = env.step("zzzzz")
    assert obs == "Not in the word list." and not info["valid"] and info["guesses"] == 0 and not done
    obs, _, done, info = env.step("I think it is about")
    assert obs == "Reply with a 5-letter word." and not info["valid"] and not done
    secret = env.secret
    wrong = [w for w in ("about", "youth") if w != secret]
    _, _, done, info = env.step(wrong[0])
    assert info["valid"] and not done and obs
    _, _, done, info = env.step(wrong[1])
    assert done and not info["won"] and 0 <= info["score"] < 1  # two legal guesses used up


def test_steps_limit_counts_invalid_replies():
    env = _env(max_steps=6)
    env.reset("train-0")
    dones = [env.step("qqqqq")[2] for _ in range(6)]
    assert dones == [False] * 5 + [True]


@pytest.mark.parametrize("reply,expected", [
    ("crane", "crane"), ("Guess: CRANE", "crane"), ("guess crane", "crane"), ("c r a n e", "crane"),
    ("zzzzz", "zzzzz"), ("cranes", None), ("two words", None), ("", None),
])
def test_parse_action(reply, expected):
    assert parse_action(reply) == expected


def test_splits_disjoint_and_seeded():
    env, other = _env(), _env(seed=1)
    secrets = {s: {env._tasks[t] for t in env.tasks(s)} for s in ("train", "dev", "test")}
    assert len(secrets["train"] | secrets["dev"] | secrets["test"]) == N
    assert [env._tasks[t] for t in env.tasks("test")] != [other._tasks[t] for t in other.tasks("test")]


def test_bad_options_fail_early():
    with pytest.raises(EnvError, match="only 482 distinct tasks"):
        _env(num_train_tasks=301)
    with pytest.raises(EnvError, match="max_guesses"):
        _env(max_guesses=0)
    with pytest.raises(EnvError, match="max_steps=3"):
        _env(max_steps=3)
