"""ALFWorld adapter on games the test builds in ALFWorld's own format and directory layout:
json_2.1.1/<split>/<task>/<trial>/{traj_data.json, game.tw-pddl}, where game.tw-pddl is
ALFWorld's JSON bundle of its PDDL domain and text grammar (shipped in the alfworld package)
plus a hand-written scene (tests/fixtures/alfworld/problem.pddl) with the task's PDDL goal."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from envs import EnvError, check_env, make_env
from envs.alfworld_env import discover_games, parse_action

FIXTURES = Path(__file__).parent / "fixtures" / "alfworld"
HAVE_ENGINE = all(importlib.util.find_spec(m) for m in ("alfworld", "fast_downward"))
needs_engine = pytest.mark.skipif(not HAVE_ENGINE, reason="alfworld / fast_downward not installed")

# split dir, task dir, goal object, goal receptacle, task text (ALFWorld's template), solvable
GAMES = [
    ("train", "pick_and_place_simple-Apple-None-CounterTop-1", "Apple", "CounterTop", "put some apple on countertop", True),
    ("train", "pick_and_place_simple-Mug-None-Fridge-1", "Mug", "Fridge", "put some mug in fridge", False),
    ("train", "look_at_obj_in_light-Mug-None-DeskLamp-1", "Mug", "CounterTop", "look at mug under the desklamp", True),
    ("train", "pick_and_place_simple-AppleSliced-None-CounterTop-1", "Apple", "CounterTop", "put a slice of apple on countertop", True),
    ("valid_seen", "pick_and_place_simple-Mug-None-Fridge-2", "Mug", "Fridge", "put some mug in fridge", True),
    ("valid_unseen", "pick_and_place_simple-Mug-None-Cabinet-3", "Mug", "Cabinet", "put some mug in cabinet", True),
]


def _alfworld_logic() -> tuple[str, str]:
    data = Path(importlib.util.find_spec("alfworld").submodule_search_locations[0]) / "data"
    return (data / "alfred.pddl").read_text(), (data / "alfred.twl2").read_text()


def build_data(root: Path, with_games: bool = True, logic: tuple[str, str] | None = None) -> Path:
    """Write the ALFWorld data layout for GAMES under root; returns root (the data_dir). `logic`
    (domain, grammar) defaults to ALFWorld's own, which needs the alfworld package."""
    problem = (FIXTURES / "problem.pddl").read_text()
    domain, grammar = (logic or _alfworld_logic()) if with_games else ("", "")
    for split, task, obj, recep, text, solvable in GAMES:
        trial = root / "json_2.1.1" / split / task / "trial_T20240101_000000_000001"
        trial.mkdir(parents=True)
        traj = {"task_type": task.split("-")[0], "pddl_params": {
            "object_target": obj, "parent_target": recep, "toggle_target": "DeskLamp" if "look" in task else "",
            "mrecep_target": "", "object_sliced": "Sliced" in task}}
        (trial / "traj_data.json").write_text(json.dumps(traj))
        if with_games:
            game = {"pddl_domain": domain, "grammar": grammar.replace("UNKNOWN GOAL", text),
                    "pddl_problem": problem.replace("{obj}", obj).replace("{recep}", recep), "solvable": solvable}
            (trial / "game.tw-pddl").write_text(json.dumps(game))
    (root / "json_2.1.1" / "train" / "pick_and_place_simple-Apple-None-Fridge-9" / "trial_T0").mkdir(parents=True)
    (root / "json_2.1.1" / "train" / "pick_and_place_simple-Apple-None-Fridge-9" / "trial_T0" / "traj_data.json"
     ).write_text(json.dumps({"task_type": "pick_and_place_simple"}))  # no game.tw-pddl: skipped
    return root


def test_parse_action():
    assert parse_action("Action: Go to countertop 1.") == "go to countertop 1"
    assert parse_action("> take apple 1 from fridge 1\nthen more") == "take apple 1 from fridge 1"
    assert parse_action("put apple 1 in/on countertop 1") == "move apple 1 to countertop 1"
    assert parse_action("put mug 1 on countertop 1") == "move mug 1 to countertop 1"
    assert parse_action("`open   fridge 1`") == "open fridge 1"
    assert parse_action("look") == "look" and parse_action("Inventory") == "inventory"
    assert parse_action("lookout") is None
    assert parse_action("I should look in the fridge") is None
    assert parse_action("") is None


def test_missing_data_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(EnvError, match=r"env.data_dir is not set.*alfworld-download.*env.data_dir="):
        make_env("alfworld")
    with pytest.raises(EnvError, match=r"has no json_2.1.1/.*alfworld-download.*ALFWORLD_DATA"):
        make_env("alfworld", data_dir=str(tmp_path))
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(EnvError, match="nowhere' has no json_2.1.1"):
        make_env("alfworld")


def test_layout_discovery_filters_like_alfworld(tmp_path):
    root = build_data(tmp_path, with_games=False)
    assert discover_games(root, "train") == []  # no game.tw-pddl files at all
    root2 = build_data(tmp_path / "full", logic=("(define (domain stub))", "grammar stub"))  # discovery reads no logic
    train = discover_games(root2, "train")
    # the unsolvable game, the Sliced one and the trial without a game file are left out
    assert train == ["train/look_at_obj_in_light-Mug-None-DeskLamp-1/trial_T20240101_000000_000001",
                     "train/pick_and_place_simple-Apple-None-CounterTop-1/trial_T20240101_000000_000001"]
    assert discover_games(root2, "train", ("pick_and_place_simple",)) == train[1:]
    assert discover_games(root2, "dev") == ["valid_seen/pick_and_place_simple-Mug-None-Fridge-2/trial_T20240101_000000_000001"]
    assert discover_games(root2, "test")[0].startswith("valid_unseen/pick_and_place_simple-Mug-None-Cabinet-3/")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if not HAVE_ENGINE:
        pytest.skip("alfworld / fast_downward not installed")
    root = build_data(tmp_path_factory.mktemp("alfworld"))
    env = make_env("alfworld", data_dir=str(root), task_types=["pick_and_place_simple"], max_steps=12)
    yield env
    env.close()


@needs_engine
def test_bad_options(env):
    with pytest.raises(EnvError, match="task_types: unknown \\['boil'\\]"):
        make_env("alfworld", data_dir=str(env.data_dir), task_types=["boil"])
    with pytest.raises(EnvError, match="split 'valid_seen'"):
        env.tasks("valid_seen")
    with pytest.raises(EnvError, match="not a playable game"):
        env.reset("train/pick_and_place_simple-Mug-None-Fridge-1/trial_T20240101_000000_000001")


@pytest.mark.slow
@needs_engine
def test_check_env_expert_wins_every_split(env):
    for split in ("train", "dev", "test"):
        assert len(env.tasks(split)) == 1
        check_env(env, split)


@pytest.mark.slow
@needs_engine
def test_episode_observations_validity_and_win(env):
    task = env.tasks("train")[0]
    obs, info = env.reset(task)
    assert "Your task is to: put some apple on countertop." in obs
    assert "fridge 1" in obs and "countertop 1" in obs and not info["won"]
    assert "go to fridge 1" in info["admissible"]
    assert all(parse_action(a) == a for a in info["admissible"])  # every admissible command parses
    obs, reward, done, info = env.step("take apple 1 from fridge 1")  # not there yet
    assert not info["valid"] and obs == "Nothing happens." and not done and reward == 0.0
    _, _, _, info = env.step("fly to the moon")
    assert not info["valid"]
    for action in ["go to fridge 1", "open fridge 1", "take apple 1 from fridge 1", "go to countertop 1"]:
        obs, reward, done, info = env.step(action)
        assert info["valid"] and not done and reward == 0.0, action
    obs, reward, done, info = env.step("put apple 1 in/on countertop 1")
    assert info["valid"] and done and info["won"] and reward == 1.0 and info["score"] == 1.0
    assert env.expert_actions(task)[-1] == "move apple 1 to countertop 1"


@pytest.mark.slow
@needs_engine
def test_random_admissible_actions_and_truncation(env):
    rng = random.Random(0)
    wins, task = 0, env.tasks("test")[0]
    for _ in range(5):
        _, info = env.reset(task)
        done = False
        while not done:
            _, _, done, info = env.step(rng.choice(info["admissible"]))
        wins += info["won"]
        assert info["won"] or (info["truncated"] and env.steps == 12)
    assert wins < 5
