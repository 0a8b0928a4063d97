import random

import pytest

from envs import EnvError, check_env, make_env
from envs.scienceworld_env import normalise, parse_action, score_from_raw, split_task_id


def test_parse_action():
    assert parse_action("Action: Focus on  the dove.\nbecause it lives") == "focus on the dove"
    assert parse_action("\n  `go to kitchen`  ") == "go to kitchen"
    assert parse_action("> open door to greenhouse") == "open door to greenhouse"
    assert parse_action("move flower pot 8 to red box") == "move flower pot 8 to red box"
    assert parse_action("wait1") == "wait1" and parse_action("waiting") is None  # whole words only
    assert parse_action("wait") == "wait"
    assert parse_action("reset task") is None
    assert parse_action("I think we should go") is None
    assert parse_action("") is None and parse_action("  \n ") is None
    assert parse_action("gopher") is None


def test_small_helpers():
    assert split_task_id("find-plant:train:3") == ("find-plant", "train", 3)
    assert split_task_id("a:b:c:dev:151") == ("a:b:c", "dev", 151)
    for bad in ("find-plant:3", "find-plant:train:x", "x"):
        with pytest.raises(EnvError, match="task id"):
            split_task_id(bad)
    assert [score_from_raw(x) for x in (-1.0, 0.0, 0.25, 1.0, 1.5)] == [0.0, 0.0, 0.25, 1.0, 1.0]
    assert normalise("  Open   Door to Kitchen ") == "open door to kitchen"


def test_bad_options_fail_before_starting_java():
    with pytest.raises(EnvError, match="unknown ScienceWorld task 'find-dragon'"):
        make_env("scienceworld", task_names=["find-dragon"])
    with pytest.raises(EnvError, match="max_steps"):
        make_env("scienceworld", max_steps=0)


@pytest.fixture(scope="module")
def env():
    env = make_env("scienceworld", max_variations_per_task=2, max_steps=15, list_admissible=True)
    yield env
    env.close()


@pytest.mark.slow
def test_check_env_gold_paths_win_on_every_split(env):
    for split in ("train", "dev", "test"):
        tasks = env.tasks(split)
        assert len(tasks) == 8 and all(t.split(":")[1] == split for t in tasks)
        check_env(env, split, max_tasks=len(tasks))


@pytest.mark.slow
def test_gold_rewards_sum_to_score_and_reset_shows_task(env):
    task = env.tasks("train")[4]  # a find-plant variation
    obs, info = env.reset(task)
    assert obs.startswith("Task Description:") and "find a(n) plant" in obs
    assert info == {**info, "valid": True, "won": False, "score": 0.0}
    assert info["admissible"] and "look around" in info["admissible"]
    expert = env.expert_actions(task)
    assert not any(a.startswith("open door to") for a in expert)  # doors are open under "easy"
    total = 0.0
    for action in expert:
        obs, reward, done, info = env.step(action)
        total += reward
        if done:
            break
    assert info["won"] and info["score"] == 1.0 and total == pytest.approx(1.0)


@pytest.mark.slow
def test_invalid_and_failing_actions(env):
    env.reset(env.tasks("dev")[0])
    obs, reward, done, info = env.step("please fly away")  # not a command at all
    assert not info["valid"] and not done and reward == 0.0 and "not a ScienceWorld command" in obs
    obs, reward, done, info = env.step("look at unicorn")  # a verb, but no such object
    assert not info["valid"] and not done and reward == 0.0
    obs, _, done, info = env.step("open door")  # ambiguous: resolved to the first candidate
    assert info["valid"] and not obs.startswith("Ambiguous")
    obs, _, done, info = env.step("focus on agent")  # wrong focus fails the task
    assert info["valid"] and done and not info["won"] and info["score"] == 0.0 and info["raw_score"] < 0


@pytest.mark.slow
def test_random_admissible_actions_mostly_lose(env):
    rng = random.Random(0)
    wins = 0
    tasks = env.tasks("train")
    for task in tasks:
        _, info = env.reset(task)
        done = False
        while not done:
            _, _, done, info = env.step(rng.choice(info["admissible"]))
        wins += info["won"]
    assert wins <= 1


@pytest.mark.slow
def test_splits_are_scienceworlds_and_disjoint():
    full = make_env("scienceworld", task_names=["find-plant"], max_variations_per_task=None)
    try:
        ids = {s: full.tasks(s) for s in ("train", "dev", "test")}
        variations = {s: {split_task_id(t)[2] for t in v} for s, v in ids.items()}
        assert [len(v) for v in variations.values()] == [150, 75, 75]
        assert not variations["train"] & variations["dev"]
        assert not variations["train"] & variations["test"]
        assert not variations["dev"] & variations["test"]
        with pytest.raises(EnvError, match="not one of this env's dev tasks"):
            full.reset("find-plant:dev:3")  # 3 is a train variation
    finally:
        full.close()
    sampled = make_env("scienceworld", task_names=["find-plant"], max_variations_per_task=5, seed=1)
    try:
        train = sampled.tasks("train")
        assert len(train) == 5 and set(train) <= set(ids["train"])
    finally:
        sampled.close()
