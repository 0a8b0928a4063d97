import math
from collections import Counter

import pytest

from envs import EnvError, check_env, make_env
from envs.twenty_questions import OBJECTS, QUESTIONS, parse_action

N = len(OBJECTS)


def _env(**kw):
    return make_env("twenty_questions", **{"num_train_tasks": 60, "num_dev_tasks": 10, "num_test_tasks": 26, **kw})


def test_every_object_has_its_own_row_and_the_expert_wins_every_split_in_at_most_ten():
    assert N == 96 and len(set(OBJECTS.values())) == N
    env = _env()
    for split in ("train", "dev", "test"):
        check_env(env, split, max_tasks=len(env.tasks(split)))
    lengths = [len(env.expert_actions(t)) for s in ("train", "dev", "test") for t in env.tasks(s)]
    assert max(lengths) <= 10 and sum(lengths) / N < 8.0  # halving: log2(96) = 6.6 questions + the guess


def test_splits_disjoint_and_every_object_used():
    env = _env()
    secrets = {s: [env._tasks[t] for t in env.tasks(s)] for s in ("train", "dev", "test")}
    assert Counter(o for v in secrets.values() for o in v) == Counter(list(OBJECTS))  # each exactly once
    other = _env(seed=1)
    assert secrets["train"] != [other._tasks[t] for t in other.tasks("train")]
    with pytest.raises(EnvError, match="only 96 distinct tasks"):
        _env(num_train_tasks=90)


def test_answers_and_progress_by_hand():
    env = _env()
    task = next(t for t, o in env._tasks.items() if o == "cat")
    obs, info = env.reset(task)
    assert obs == "I am thinking of an object. You have 20 questions." and info["progress"] == 0.0
    denom = math.log2(N) + 1

    def expect(reply, answer, n):
        obs, reward, done, info = env.step(reply)
        assert (obs, info["candidates"]) == (answer, n)
        assert info["progress"] == pytest.approx(math.log2(N / n) / denom) and info["score"] == info["progress"]
        assert info["valid"] and not done and reward == 0.0

    expect("Is it alive?", "Yes.", 34)  # 15 mammals, 6 birds, 3 fish, 3 insects, 3 reptiles, 4 plants
    expect("is it a mammal", "Yes.", 15)
    expect("is it a mammal?", "Yes.", 15)  # asked again: nothing learnt
    expect("is it a dog?", "No.", 14)  # a wrong guess removes that object
    expect("is it a pet?", "Yes.", 2)  # cat, rabbit
    obs, reward, done, info = env.step("is it a cat?")
    assert obs == "Yes! It is a cat. You won." and done and info["won"] and reward == 1.0
    assert info["progress"] == info["score"] == 1.0  # the right guess is worth the last bit


def test_invalid_questions_cost_a_turn_and_end_the_game():
    env = _env(max_questions=3)
    env.reset("train-0")
    obs, _, done, info = env.step("is it bigger than a breadbox?")
    assert obs == "I cannot answer that." and not info["valid"] and not done and info["candidates"] == N
    _, _, done, info = env.step("is it a unicorn?")
    assert not info["valid"] and not done
    _, _, done, info = env.step("is it alive?")
    assert info["valid"] and done and not info["won"] and 0 < info["score"] < 1


@pytest.mark.parametrize("reply,expected", [
    ("Is it an animal?", "is it an animal?"), ("can it fly", "can it fly?"), ("is it an apple", "is it an apple?"),
    ("Action: is it a apple?", "is it an apple?"), ("is it scissors?", "is it scissors?"), ("is it cat", "is it a cat?"),
    ("is it a dragon?", None), ("does it bark?", None), ("", None),
])
def test_parse_action(reply, expected):
    assert parse_action(reply) == expected


def test_prompt_lists_questions_only_when_asked_and_bad_options_fail():
    assert all(q in _env().system_prompt for q in QUESTIONS.values()) and "watermelon" in _env().system_prompt
    short = _env(list_in_prompt=False).system_prompt
    assert len(short) < 150 and "watermelon" not in short
    with pytest.raises(EnvError, match="max_questions"):
        _env(max_questions=0)
    with pytest.raises(EnvError, match="split 'val'"):
        _env().tasks("val")


def test_default_options_use_every_object_once():
    env = make_env("twenty_questions")
    assert [len(env.tasks(s)) for s in ("train", "dev", "test")] == [60, 10, 26]
    check_env(env, "test", max_tasks=26)
