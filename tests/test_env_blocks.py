import itertools
import random

import pytest

from envs import EnvError, check_env, make_env
from envs.blocks import TABLE, apply_move, arrangements, parse_action, plan, well_placed


def test_arrangement_counts_are_the_ordered_set_partitions():
    # sum over k of Lah numbers L(n, k): 1, 3, 13, 73, 501
    assert [len(arrangements(n)) for n in (1, 2, 3, 4, 5)] == [1, 3, 13, 73, 501]


def _optimal_length(start, goal):
    """Breadth-first search over every move: the true shortest plan."""
    frontier, seen, depth = [start], {start}, 0
    letters = "ABCDEF"[:len(start)]
    while goal not in frontier:
        depth += 1
        nxt = []
        for s in frontier:
            for b, t in itertools.product(letters, (TABLE,) + tuple(letters)):
                new, _ = apply_move(s, b, t)
                if new is not None and new not in seen:
                    seen.add(new)
                    nxt.append(new)
        frontier = nxt
    return depth


@pytest.mark.parametrize("n", [2, 3, 4])
def test_expert_wins_every_task_within_2n_moves_and_never_moves_a_well_placed_block(n):
    pairs = [(s, g) for s in arrangements(n) for g in arrangements(n) if s != g]
    env = make_env("blocks", num_blocks=n, num_train_tasks=len(pairs), num_dev_tasks=0, num_test_tasks=0)
    check_env(env, "train", max_tasks=len(pairs))
    worst = 0
    for start, goal in pairs:
        state, moves = start, plan(start, goal)
        assert len(moves) <= 2 * n
        for block, target in moves:
            assert block not in well_placed(state, goal)
            state = apply_move(state, block, target)[0]
        assert state == goal
        worst = max(worst, len(moves) - _optimal_length(start, goal))
    assert worst <= (0 if n <= 3 else 1)  # the greedy planner is optimal on 3 blocks, near it on 4


def test_observation_moves_and_progress_by_hand():
    env = make_env("blocks", num_train_tasks=156, num_dev_tasks=0, num_test_tasks=0)
    start = ("table", "A", "table")  # B on A; C alone
    goal = ("B", "C", "table")  # A on B on C
    task = next(t for t, v in env._tasks.items() if v == (start, goal))
    obs, info = env.reset(task)
    assert obs == ("Now: A is on the table. B is on A. C is on the table.\n"
                   "Goal: A on B, B on C, C on the table.")
    assert info["progress"] == 0.0 and info["well_placed"] == 1  # C already stands where it must
    obs, _, done, info = env.step("move a onto c")
    assert not info["valid"] and obs.startswith("Nothing happens: A is not clear.\n") and info["progress"] == 0.0
    _, _, _, info = env.step("Action: put B on C")  # B on C (on the table): well placed, 1 of the 2 left
    assert info["valid"] and info["progress"] == 0.5
    _, _, _, info = env.step("move b onto table")  # breaking a well-placed block takes its share back
    assert info["valid"] and info["progress"] == 0.0
    env.step("move b onto c")
    obs, reward, done, info = env.step("move a onto b")
    assert done and info["won"] and reward == 1.0 and info["progress"] == 1.0
    assert obs == "The blocks match the goal. You won."


def test_state_key_names_the_arrangement_whatever_the_feedback():
    env = make_env("blocks", num_blocks=3)
    obs0, info0 = env.reset(env.tasks("train")[0])
    moves = [(b, t) for b in "ABC" for t in "ABC" + "T"]
    refused = next((b, t) for b, t in moves if apply_move(env.state, b, TABLE if t == "T" else t)[0] is None)
    accepted = next((b, t) for b, t in moves if apply_move(env.state, b, TABLE if t == "T" else t)[0] is not None)
    say = lambda b, t: f"move {b.lower()} onto {'table' if t == 'T' else t.lower()}"  # noqa: E731
    obs1, _, _, info1 = env.step(say(*refused))
    assert not info1["valid"] and obs1.startswith("Nothing happens") and obs1 != obs0
    assert info1["state"] == info0["state"] == " ".join(env.state)
    _, _, _, info2 = env.step(say(*accepted))
    assert info2["valid"] and info2["state"] != info0["state"] and info2["state"] == " ".join(env.state)


def test_invalid_moves_say_why_and_change_nothing():
    assert apply_move(("table", "A", "table"), "A", "C") == (None, "A is not clear")
    assert apply_move(("table", "A", "table"), "C", "A") == (None, "A is not clear")
    assert apply_move(("table", "A", "table"), "C", "C") == (None, "C cannot go onto itself")
    assert apply_move(("table", "A", "table"), "C", "table") == (None, "C is already on the table")
    assert apply_move(("table", "A", "table"), "D", "table") == (None, "there is no block D")
    assert apply_move(("table", "A", "table"), "B", "C") == (("table", "C", "table"), "")


def test_parse_action_accepts_the_documented_forms_only():
    assert parse_action("move a onto b") == "move a onto b"
    assert parse_action("Put C on the table.\nthen more") == "move c onto table"
    assert parse_action("stack block b on block a") == parse_action("move b block onto a") == "move b onto a"
    assert parse_action("move b onto a c") is None and parse_action("move bb onto a") is None
    assert parse_action("go north") is None and parse_action("") is None


def test_random_play_score_is_the_sum_of_increments_and_wins_only_at_one():
    env = make_env("blocks", num_blocks=4, num_train_tasks=60, num_dev_tasks=0, num_test_tasks=0)
    pool = [f"move {b} onto {t}" for b in "abcd" for t in ["table", *"abcd"]] + ["hello", "move e onto a"]
    rng = random.Random(0)
    wins = invalid = steps = 0
    for task in env.tasks("train"):
        _, info = env.reset(task)
        assert info["progress"] == 0.0
        done, prev, total = False, 0.0, 0.0
        while not done:
            _, reward, done, info = env.step(rng.choice(pool))
            steps += 1
            invalid += not info["valid"]
            assert info["score"] == info["progress"] and 0.0 <= info["progress"] <= 1.0
            assert info["won"] == (info["progress"] == 1.0) == (reward == 1.0)
            if not info["valid"]:
                assert info["progress"] == prev
            total += info["progress"] - prev
            prev = info["progress"]
        assert total == pytest.approx(info["score"])
        wins += info["won"]
    assert 0 < invalid < steps and wins < 30


def test_splits_are_disjoint_and_bad_options_fail_clearly():
    env = make_env("blocks", num_train_tasks=100, num_dev_tasks=20, num_test_tasks=36)
    sets = {s: {env._tasks[t] for t in env.tasks(s)} for s in ("train", "dev", "test")}
    assert [len(v) for v in sets.values()] == [100, 20, 36]
    assert not (sets["train"] & sets["dev"] or sets["train"] & sets["test"] or sets["dev"] & sets["test"])
    with pytest.raises(EnvError, match="only 156 distinct tasks"):
        make_env("blocks", num_train_tasks=150, num_dev_tasks=10, num_test_tasks=0)
    with pytest.raises(EnvError, match="num_blocks=7"):
        make_env("blocks", num_blocks=7)
    with pytest.raises(EnvError, match="split 'val'"):
        env.tasks("val")
