import random

import pytest

from envs import EnvError, check_env, make_env, registered_names
from envs.keydoor import ACTIONS, parse_action, walk


@pytest.fixture
def env():
    return make_env("keydoor", size=3, num_train_tasks=40, num_dev_tasks=5, num_test_tasks=20)


def test_check_env_all_splits(env):
    for split in ("train", "dev", "test"):
        check_env(env, split, max_tasks=len(env.tasks(split)))


def test_splits_do_not_share_layouts(env):
    layouts = {s: {env._layouts[t] for t in env.tasks(s)} for s in ("train", "dev", "test")}
    assert not layouts["train"] & layouts["test"]
    assert not layouts["train"] & layouts["dev"]
    assert len(layouts["train"]) == 40


def test_progress_only_from_key_and_door(env):
    env.reset("train-3")
    prev = 0.0
    for action in env.expert_actions("train-3"):
        _, reward, done, info = env.step(action)
        increment = info["progress"] - prev
        prev = info["progress"]
        assert increment == (0.5 if action in ("take key", "open door") else 0.0)
        assert info["score"] == info["progress"]  # the outcome is the sum of the increments
    assert done and info["won"] and reward == 1.0 and info["score"] == 1.0


def test_dropping_the_key_undoes_progress_and_lowers_the_score():
    env = make_env("keydoor", size=2, max_steps=5, num_train_tasks=4, num_dev_tasks=0, num_test_tasks=0)
    env.reset("train-0")  # key 1 step north
    env.step("go north")
    _, _, _, info = env.step("take key")
    assert info["progress"] == 0.5 and info["score"] == 0.5
    obs, _, _, info = env.step("drop key")
    assert info["valid"] and info["progress"] == 0.0 and obs.startswith("You dropped the key. The key is here.")
    _, _, done, info = env.step("take key")
    assert not done and info["score"] == 0.5
    _, _, done, info = env.step("go south")
    assert done and info["score"] == 0.5 and not info["won"]  # time is up holding the key: partial score


def test_random_actions_mostly_lose(env):
    rng = random.Random(0)
    wins = 0
    for task in env.tasks("train"):
        env.reset(task)
        done = False
        while not done:
            _, _, done, info = env.step(rng.choice(ACTIONS))
        wins += info["won"]
    assert wins / len(env.tasks("train")) < 0.2


def test_invalid_actions_are_reported_not_raised(env):
    obs, _ = env.reset("train-0")  # key 2 steps east, door 2 steps north
    obs, _, done, info = env.step("open door")
    assert not info["valid"] and not done and obs.startswith("Nothing happens: you do not hold the key.")
    obs, _, _, info = env.step("dance wildly")
    assert not info["valid"] and "not a valid action" in obs
    obs, _, _, info = env.step("go south")
    obs, _, _, info = env.step("go south")
    obs, _, _, info = env.step("go south")
    assert not info["valid"] and "wall to the south" in obs


def test_state_key_is_equal_for_equal_states_whatever_the_feedback(env):
    _, info0 = env.reset("train-0")  # key 2 steps east, door 2 steps north: a wall to the south
    _, _, _, refused = env.step("go south")
    _, _, _, moved = env.step("go east")
    obs, _, _, back = env.step("go west")
    assert not refused["valid"] and refused["state"] == info0["state"] == back["state"]
    assert moved["state"] != info0["state"] and obs.startswith("You walk west.")
    env.step("go east")
    env.step("go east")
    _, _, _, taken = env.step("take key")
    assert taken["progress"] == 0.5 and taken["state"] != moved["state"] and "held" in taken["state"]


def test_episode_ends_at_max_steps():
    env = make_env("keydoor", size=2, max_steps=3, num_train_tasks=4, num_dev_tasks=0, num_test_tasks=0)
    env.reset("train-0")
    dones = [env.step("take nothing")[2] for _ in range(3)]
    assert dones == [False, False, True]


@pytest.mark.parametrize("reply,expected", [
    ("go north", "go north"), ("Action: Take Key.", "take key"), ("\n  open   door!\nmore", "open door"),
    ("", None), ("I think I should", None), ("north", None),
])
def test_parse_action(reply, expected):
    assert parse_action(reply) == expected


def test_bad_options_fail_early():
    with pytest.raises(EnvError, match="size"):
        make_env("keydoor", size=1)
    with pytest.raises(EnvError, match="layouts"):
        make_env("keydoor", size=2, num_train_tasks=100)
    with pytest.raises(EnvError, match="not a registered environment"):
        make_env("nope")
    assert "keydoor" in registered_names()


def test_user_env_by_module_path():
    env = make_env("envs.keydoor:KeyDoorEnv", size=2, num_train_tasks=3, num_dev_tasks=0, num_test_tasks=1)
    assert env.tasks("test") == ["test-0"]


def test_two_doors_only_one_opens_and_the_oracle_knows_which():
    env = make_env("keydoor", size=3, doors=2, num_train_tasks=30, num_dev_tasks=0, num_test_tasks=10)
    assert env.max_steps == 4 * 3 + 2 + 2 * 3
    assert "2 doors and only one of them opens" in env.system_prompt
    check_env(env, "train", max_tasks=30)
    opens = {env._layouts[t][-1] for t in env.tasks("train")}
    assert opens == {0, 1}  # both doors are the right one in some layouts
    obs, _ = env.reset("train-0")
    assert "The red door" in obs and "The blue door" in obs and "(jammed)" not in obs

    # the wrong door first: a valid try that jams it, no progress; trying it again is invalid
    env.reset("train-0")
    wrong = env.door_cells[1 - env.door_cells.index(env.door)]
    wrong_colour = "red" if env.door_cells.index(wrong) == 0 else "blue"
    for a in walk(env.pos, env.key) + ["take key"]:
        env.step(a)
    for a in walk(env.pos, wrong):
        env.step(a)
    obs, reward, done, info = env.step("open door")
    assert info["valid"] and not done and reward == 0.0 and info["progress"] == 0.5
    assert obs.startswith(f"The {wrong_colour} door does not open: it is jammed.")
    assert f"The {wrong_colour} door (jammed) is here." in obs
    obs, _, done, info = env.step("open door")
    assert not info["valid"] and not done and f"the {wrong_colour} door is jammed" in obs
    for a in walk(env.pos, env.door):  # recovery: the other door opens
        env.step(a)
    _, reward, done, info = env.step("open door")
    assert done and info["won"] and reward == 1.0 and info["score"] == 1.0


def test_two_doors_layout_count_and_bad_door_counts():
    with pytest.raises(EnvError, match="doors=5"):
        make_env("keydoor", size=3, doors=5)
    with pytest.raises(EnvError, match="doors=3"):
        make_env("keydoor", size=2, doors=3)
    env = make_env("keydoor", size=2, doors=2, num_train_tasks=48, num_dev_tasks=0, num_test_tasks=0)
    assert len({env._layouts[t] for t in env.tasks("train")}) == 48  # 2 * 4! distinct layouts, all used
    with pytest.raises(EnvError, match="only 48 layouts"):
        make_env("keydoor", size=2, doors=2, num_train_tasks=49, num_dev_tasks=0, num_test_tasks=0)
