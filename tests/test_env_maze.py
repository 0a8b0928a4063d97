import pytest

from envs import EnvError, check_env, make_env
from envs.maze import MAZES, distances, free_cells, parse_action, shortest_path


@pytest.mark.parametrize("observed", ["full", "partial"])
@pytest.mark.parametrize("maze", sorted(MAZES))
def test_expert_wins_every_task_of_every_split(maze, observed):
    env = make_env("maze", maze=maze, observed=observed, goal="fixed", num_train_tasks=3, num_dev_tasks=1,
                   num_test_tasks=len(free_cells(maze)) - 5)
    for split in ("train", "dev", "test"):
        check_env(env, split, max_tasks=len(env.tasks(split)))


def test_expert_wins_all_pairs_and_is_shortest():
    env = make_env("maze", maze="all", num_train_tasks=3000, num_dev_tasks=0, num_test_tasks=0)
    check_env(env, "train", max_tasks=3000)
    for task in env.tasks("train")[:200]:
        maze, start, goal = env._tasks[task]
        assert len(env.expert_actions(task)) == distances(maze, goal)[start]


def test_splits_are_disjoint_and_seeded():
    env = make_env("maze", num_train_tasks=300, num_dev_tasks=100, num_test_tasks=200)  # 26*25 = 650 pairs
    sets = {s: {env._tasks[t] for t in env.tasks(s)} for s in ("train", "dev", "test")}
    assert len(sets["train"]) == 300 and len(sets["test"]) == 200
    assert not sets["train"] & sets["dev"] and not sets["train"] & sets["test"] and not sets["dev"] & sets["test"]
    other = make_env("maze", num_train_tasks=300, num_dev_tasks=100, num_test_tasks=200, seed=1)
    assert [env._tasks[t] for t in env.tasks("train")] != [other._tasks[t] for t in other.tasks("train")]
    with pytest.raises(EnvError, match="only 650 distinct tasks"):
        make_env("maze", num_train_tasks=600, num_dev_tasks=51, num_test_tasks=0)


def _task(env, maze, start, goal):
    return next(t for t, v in env._tasks.items() if v == (maze, start, goal))


def test_observations_and_progress_by_hand():
    env = make_env("maze", goal="fixed", num_train_tasks=25, num_dev_tasks=0, num_test_tasks=0)
    task = _task(env, "double_t", (1, 1), (8, 6))  # LMRL-Gym's start and goal: 12 steps apart
    obs, info = env.reset(task)
    assert obs == "You are at 1,1. The goal is at 8,6. Walls: up, down, left."
    assert info["progress"] == 0.0 and env.start_distance == 12
    obs, _, _, info = env.step("move right")
    assert obs == "You are at 1,2. The goal is at 8,6. Walls: up, down." and info["progress"] == pytest.approx(1 / 12)
    _, _, _, info = env.step("go west")  # synonym; back to the start
    assert info["valid"] and info["progress"] == 0.0
    env.reset(_task(env, "double_t", (1, 2), (8, 6)))
    _, _, _, info = env.step("move left")  # farther than at the start: clamped at 0, never below
    assert info["valid"] and info["distance"] == 12 and info["progress"] == 0.0 and info["score"] == 0.0
    env.reset(task)
    prev, increments = 0.0, []
    for action in env.expert_actions(task):
        _, reward, done, info = env.step(action)
        increments.append(info["progress"] - prev)
        prev = info["progress"]
    assert increments == pytest.approx([1 / 12] * 12) and sum(increments) == pytest.approx(info["score"])
    assert done and info["won"] and reward == 1.0 and info["score"] == 1.0


def test_partial_observation_shows_only_walls():
    env = make_env("maze", observed="partial", goal="fixed", num_train_tasks=25, num_dev_tasks=0, num_test_tasks=0)
    obs, _ = env.reset(_task(env, "double_t", (5, 6), (8, 6)))
    assert obs == "Walls: up." and "only the walls" in env.system_prompt
    obs, _, _, info = env.step("move down")
    assert obs == "Walls: left, right." and info["progress"] == pytest.approx(1 / 3)


def test_walls_and_malformed_actions_are_invalid_steps():
    env = make_env("maze", goal="fixed", max_steps=4, num_train_tasks=25, num_dev_tasks=0, num_test_tasks=0)
    env.reset(_task(env, "double_t", (1, 1), (8, 6)))
    obs, _, done, info = env.step("move up")
    assert not info["valid"] and not done and obs.startswith("Nothing happens: there is a wall up. You are at 1,1.")
    obs, _, done, info = env.step("dance")
    assert not info["valid"] and "not a valid action" in obs and env.pos == (1, 1)
    env.step("move down")
    _, _, done, info = env.step("move right")
    assert done and not info["won"] and info["score"] == pytest.approx(1 / 12)  # max_steps=4 reached


@pytest.mark.parametrize("reply,expected", [
    ("move up", "move up"), ("Action: Move Left.", "move left"), ("go north\nthen", "move up"),
    ("go east", "move right"), ("move", None), ("up", None), ("move diagonally", None), ("", None),
])
def test_parse_action(reply, expected):
    assert parse_action(reply) == expected


def test_bad_options_fail_early():
    for kwargs, match in [({"maze": "spiral"}, "env.maze='spiral'"), ({"observed": "some"}, "env.observed"),
                          ({"goal": "far"}, "env.goal"), ({"max_steps": 0}, "max_steps"),
                          ({"num_dev_tasks": -1}, "num_dev_tasks")]:
        with pytest.raises(EnvError, match=match):
            make_env("maze", **kwargs)


def test_shortest_path_on_umaze():
    assert shortest_path("umaze", (3, 1), (3, 3)) == ["move up", "move up", "move right", "move right",
                                                      "move down", "move down"]


def test_compass_wording_for_the_tiny_tokenizer():
    env = make_env("maze", wording="compass", goal="fixed", num_train_tasks=25, num_dev_tasks=0, num_test_tasks=0)
    task = _task(env, "double_t", (1, 1), (8, 6))
    obs, _ = env.reset(task)
    assert obs == "You are at 1,1. The goal is at 8,6. Walls: north, south, west."
    assert env.system_prompt.endswith("go north, go south, go west, go east.")
    assert env.expert_actions(task)[:3] == ["go east", "go east", "go south"]
    assert env.parse_action("move up") == "go north" and env.parse_action("Go East") == "go east"
    obs, _, _, info = env.step("go north")
    assert not info["valid"] and obs.startswith("Nothing happens: there is a wall to the north.")
    check_env(env, "train", max_tasks=25)
