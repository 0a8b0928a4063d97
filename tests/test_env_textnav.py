import pytest

from envs import EnvError, check_env, make_env
from envs.textnav import EXITS, OBJECTS, RECEPTACLES, ROOMS, parse_action, path

ALL = {"num_train_tasks": 150, "num_dev_tasks": 24, "num_test_tasks": 50}


@pytest.fixture
def env():
    return make_env("textnav", **ALL)


def _task(env, start, obj, target):
    return next(t for t, v in env._tasks.items() if v == (start, obj, target))


def test_house_is_lmrl_gyms_and_passages_go_both_ways():
    assert len(ROOMS) == 8 and len(RECEPTACLES) == 5 and len(OBJECTS) == 7
    for room, exits in EXITS.items():
        for direction, other in exits.items():
            assert room in EXITS[other].values()
    assert path("garden", "bathroom") == ["go south", "go east", "go east", "go east", "go south"]


def test_expert_wins_all_224_quests(env):
    for split in ("train", "dev", "test"):
        check_env(env, split, max_tasks=len(env.tasks(split)))
    assert max(len(env.expert_actions(t)) for t in env._tasks) == 12


def test_splits_disjoint_and_seeded(env):
    quests = {s: {env._tasks[t] for t in env.tasks(s)} for s in ("train", "dev", "test")}
    assert sum(map(len, quests.values())) == 224 == len(quests["train"] | quests["dev"] | quests["test"])
    other = make_env("textnav", **ALL, seed=3)
    assert [env._tasks[t] for t in env.tasks("dev")] != [other._tasks[t] for t in other.tasks("dev")]
    with pytest.raises(EnvError, match="only 224 distinct tasks"):
        make_env("textnav", num_train_tasks=200, num_dev_tasks=25, num_test_tasks=0)


def test_lmrl_quest_progress_by_hand(env):
    task = _task(env, "bedroom", "stale food", "fridge@kitchen")  # LMRL-Gym's own quest
    obs, info = env.reset(task)
    assert obs == ("Task: put the stale food from the table in the living room in the fridge in the kitchen. "
                   "You are in the bedroom. Exits: west, south. A table with bowl.")
    assert env.expert_actions(task) == ["go west", "take stale food", "go west", "go west", "open fridge",
                                        "put stale food in fridge", "close fridge"]
    progress = []
    for action in env.expert_actions(task):
        obs, reward, done, info = env.step(action)
        progress.append(info["progress"])
    assert progress == [0, 0.25, 0.25, 0.25, 0.5, 0.75, 1.0] and info["score"] == 1.0
    assert done and info["won"] and reward == 1.0 and obs == "You close the fridge. You won."


def test_table_quest_and_undoing_progress(env):
    task = _task(env, "living room", "fruit", "table@dining room")  # the fruit is in the closed fridge
    env.reset(task)
    steps = [("go west", 0), ("go west", 0), ("take fruit", None), ("open fridge", 0), ("take fruit", 0.5),
             ("drop fruit", 0.0), ("take the fruit from the floor", 0.5), ("take fruit", None), ("go east", 0.5),
             ("put fruit on table", 1.0)]
    for action, expected in steps:
        obs, _, done, info = env.step(action)
        assert info["valid"] == (expected is not None), action
        if expected is not None:
            assert info["progress"] == expected, action
    assert done and info["won"]


def test_closing_the_target_early_takes_progress_back(env):
    env.reset(_task(env, "kitchen", "fruit", "chest@office"))
    _, _, _, info = env.step("open fridge")
    assert info["progress"] == 0
    _, _, _, info = env.step("take fruit")
    assert info["progress"] == 0.25
    for a in path("kitchen", "office"):
        env.step(a)
    assert env.step("open chest")[3]["progress"] == 0.5
    assert env.step("close chest")[3]["progress"] == 0.25
    obs, _, _, info = env.step("put fruit in chest")
    assert not info["valid"] and obs.startswith("Nothing happens: the chest is closed.")


def test_invalid_commands(env):
    env.reset(_task(env, "bedroom", "bowl", "table@living room"))
    for action, why in [("go north", "you cannot go north from here"), ("go to kitchen", "you cannot go to kitchen"),
                        ("eat bowl", "not a valid command"), ("open table", "there is no table to open here"),
                        ("put bowl on table", "you do not carry bowl"), ("take plate", "no plate you can take"),
                        ("drop bowl", "you do not carry bowl"), ("take bowl from fridge", "not in the fridge")]:
        obs, _, done, info = env.step(action)
        assert not info["valid"] and not done and why in obs, action
    obs, _, _, info = env.step("go to the living room")
    assert info["valid"] and obs.startswith("You are in the living room.")


def test_partial_observation_hides_the_room_and_steps_run_out():
    env = make_env("textnav", observed="partial", max_steps=2, **ALL)
    obs, _ = env.reset(_task(env, "bedroom", "bowl", "table@living room"))
    assert obs.endswith("Exits: west, south. A table with bowl.") and "You are in" not in obs
    assert env.step("look")[3]["valid"] and env.step("look")[2]


@pytest.mark.parametrize("reply,expected", [
    ("Go West", "go west"), ("insert stale food into fridge", "put stale food in fridge"),
    ("put the bowl on the table.", "put bowl in table"), ("take stale food from table", "take stale food from table"),
    ("go to the dining room", "go to dining room"), ("close fridge", "close fridge"),
    ("go up", None), ("", None), ("please help", None),
])
def test_parse_action(reply, expected):
    assert parse_action(reply) == expected


def test_bad_options_fail_early():
    with pytest.raises(EnvError, match="env.observed"):
        make_env("textnav", observed="hidden")
    with pytest.raises(EnvError, match="max_steps"):
        make_env("textnav", max_steps=0)
