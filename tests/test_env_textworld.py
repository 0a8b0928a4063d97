"""TextWorld env: real generated games, played through the env protocol."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from envs import EnvError, check_env, make_env
from envs.textworld_env import clean_observation, game_seed, normalize_command, parse_action

pytest.importorskip("textworld")

SMALL = dict(num_train_games=3, num_dev_games=1, num_test_games=2, quest_length=3, world_size=4,
             nb_objects=6, seed=0, max_steps=30, progress=False)


@pytest.fixture(scope="session")
def tw_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("textworld-cache")


@pytest.fixture(scope="session")
def env(tw_cache):
    e = make_env("textworld", cache_dir=str(tw_cache), **SMALL)
    yield e
    e.close()


def all_tasks(env):
    return env.tasks("train") + env.tasks("dev") + env.tasks("test")


# --- pure helpers -------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    ("go east", "go east"),
    ("Action: Go East.", "go east"),
    ("action:take whisk from rack", "take whisk from rack"),
    ("\n\n  `open door`  \nbecause I want to", "open door"),
    ("> look", "look"),
    ("**Action:** inventory", "inventory"),
    ("Action:\ngo  north", "go north"),
    ('"put whisk on shelf"!', "put whisk on shelf"),
    ("", None),
    ("   \n\t\n", None),
    ("...", None),
    ("Action:", None),
])
def test_parse_action(reply, expected):
    assert parse_action(reply) == expected


def test_normalize_command():
    assert normalize_command("  Take  Whisk\tfrom RACK ") == "take whisk from rack"
    assert normalize_command(None) == ""


def test_clean_observation_strips_banner_status_and_end():
    raw = ("\n\n   ________  __  \n  |        \\|  \\ \n   \\$$$$$$$$| $$ \n\n"
           "Hello, get the key.\n\n-= Attic =-\nA dusty attic.   \n\n\n"
           ">        -= Attic =-0/1\nYou scored.\n\n   *** The End ***\nWould you like to RESTART")
    assert clean_observation(raw) == "Hello, get the key.\n-= Attic =-\nA dusty attic.\nYou scored."


def test_game_seeds_are_distinct_across_splits():
    seeds = [game_seed(0, s, k) for s in ("train", "dev", "test") for k in range(200)]
    assert len(set(seeds)) == len(seeds)
    assert game_seed(0, "train", 3) == game_seed(0, "train", 3) != game_seed(1, "train", 3)
    assert all(0 <= s < 2**31 for s in seeds)


def test_import_envs_does_not_import_textworld():
    code = "import envs, sys; assert 'textworld' not in sys.modules, 'textworld imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_textworld_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "textworld", None)  # makes `import textworld` fail
    with pytest.raises(EnvError, match="pip install textworld"):
        make_env("textworld", cache_dir=str(tmp_path), num_train_games=1)


@pytest.mark.parametrize("key, value", [("quest_length", 0), ("world_size", 0),
                                        ("num_train_games", 0), ("max_steps", 0),
                                        ("nb_objects", -1)])
def test_bad_options_fail_before_generating(tmp_path, key, value):
    with pytest.raises(EnvError, match=key):
        make_env("textworld", cache_dir=str(tmp_path), **{key: value})
    assert not any(tmp_path.iterdir())


# --- real games --------------------------------------------------------------------------------

@pytest.mark.slow
def test_check_env_and_task_ids(env):
    check_env(env, "train", max_tasks=3)
    check_env(env, "test", max_tasks=2)
    assert env.tasks("train") == ["train-0000", "train-0001", "train-0002"]
    assert env.tasks("dev") == ["dev-0000"] and env.tasks("test") == ["test-0000", "test-0001"]
    with pytest.raises(EnvError, match="split"):
        env.tasks("valid")
    with pytest.raises(EnvError, match="train-0009"):
        env.reset("train-0009")


@pytest.mark.slow
def test_experts_win_every_game(env):
    for task in all_tasks(env):
        obs, info = env.reset(task)
        actions = env.expert_actions(task)
        assert len(actions) == SMALL["quest_length"]
        for i, action in enumerate(actions):
            assert normalize_command(action) in map(normalize_command, info.get("admissible", []))
            obs, reward, done, info = env.step(action)
            assert info["valid"]
            assert done == (i == len(actions) - 1)
        assert info["won"] and info["score"] == 1.0 and reward == 1.0 and not info["lost"]
        assert "You won!" in obs


@pytest.mark.slow
def test_random_admissible_play_mostly_loses(tw_cache):
    short = make_env("textworld", cache_dir=str(tw_cache), **{**SMALL, "max_steps": 10})
    rng = random.Random(0)
    wins = episodes = 0
    for _ in range(5):
        for task in all_tasks(short):
            obs, info = short.reset(task)
            done = False
            while not done:
                obs, reward, done, info = short.step(rng.choice(info["admissible"]))
                assert info["valid"]
            assert info["score"] == float(info["won"]) == reward
            wins += info["won"]
            episodes += 1
    assert episodes == 30 and wins / episodes < 0.3
    assert short.num_generated == 0


@pytest.mark.slow
def test_random_verb_object_play_loses_and_is_mostly_invalid(env):
    verbs = ["go", "take", "open", "eat", "examine", "dance", "put", "unlock"]
    nouns = ["north", "east", "key", "door", "chest", "table", "apple", "wildly"]
    rng = random.Random(1)
    invalid = total = 0
    for task in all_tasks(env):
        obs, info = env.reset(task)
        done = False
        while not done:
            obs, reward, done, info = env.step(f"{rng.choice(verbs)} {rng.choice(nouns)}")
            invalid += not info["valid"]
            total += 1
        assert not info["won"] and info["score"] == 0.0 and info["truncated"]
        assert info["steps"] == SMALL["max_steps"]
    assert invalid / total > 0.7


@pytest.mark.slow
def test_splits_do_not_overlap(env):
    ids = [env.game_id(t) for t in all_tasks(env)]
    assert len(set(ids)) == len(ids) == 6
    records = [env.game_info(t) for t in all_tasks(env)]
    assert len({r["seed"] for r in records}) == len({r["uuid"] for r in records}) == 6
    assert all(r["hash"] == i for r, i in zip(records, ids))


@pytest.mark.slow
def test_invalid_action_is_answered_and_changes_nothing(env):
    obs0, info0 = env.reset("train-0000")
    obs, reward, done, info = env.step("dance wildly")
    assert info["valid"] is False and reward == 0.0 and not done
    assert "not a valid command" in obs and "dance wildly" in obs
    assert info["admissible"] == info0["admissible"] and info["steps"] == 1
    assert info["state"] == info0["state"] and obs != obs0  # the same world state, read differently
    first = env.expert_actions("train-0000")[0]
    obs, reward, done, info = env.step("  " + first.upper() + "  ")  # case/space-insensitive
    assert info["valid"] is True and info["state"] != info0["state"]


@pytest.mark.slow
def test_invalid_to_engine_and_end_of_episode(tw_cache):
    e = make_env("textworld", cache_dir=str(tw_cache), **{**SMALL, "max_steps": 2,
                                                          "invalid_to_engine": True})
    e.reset("test-0001")
    obs, reward, done, info = e.step("dance wildly")
    assert info["valid"] is False and "verb" in obs.lower() and not done  # the engine answers
    obs, reward, done, info = e.step("look")
    assert done and info["truncated"] and info["score"] == 0.0 and info["admissible"] == []
    obs, reward, done, info = e.step("look")  # stepping a finished episode is harmless
    assert done and info["valid"] is False and reward == 0.0
    e.close()
    with pytest.raises(EnvError, match="reset"):
        e.step("look")


@pytest.mark.slow
def test_observations_are_clean_and_list_commands(env, tw_cache):
    obs, info = env.reset("train-0001")
    assert "$$" not in obs and "\n\n" not in obs and not obs.startswith(" ")
    assert info["objective"].split(".")[0] in obs  # the goal is told in the first message
    assert "Available commands: " + ", ".join(info["admissible"]) in obs
    assert "command" in env.system_prompt and "Action:" in env.system_prompt
    quiet = make_env("textworld", cache_dir=str(tw_cache), **{**SMALL, "show_admissible": False})
    obs2, _ = quiet.reset("train-0001")
    assert "Available commands" not in obs2 and obs.startswith(obs2)
    quiet.close()


@pytest.mark.slow
def test_cache_is_reused_and_games_are_deterministic(env, tw_cache, tmp_path):
    files = sorted(p for p in env.cache_dir.iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    again = make_env("textworld", cache_dir=str(tw_cache), **SMALL)
    assert env.num_generated >= 6 and again.num_generated == 0
    assert {p: p.stat().st_mtime_ns for p in again.cache_dir.iterdir()} == mtimes
    assert [again.game_id(t) for t in all_tasks(again)] == [env.game_id(t) for t in all_tasks(env)]
    # A fresh cache rebuilds the same game from the same seed.
    fresh = make_env("textworld", cache_dir=str(tmp_path), **{**SMALL, "num_dev_games": 0,
                                                              "num_test_games": 0,
                                                              "num_train_games": 1})
    assert fresh.num_generated == 1 and fresh.game_id("train-0000") == env.game_id("train-0000")
    assert fresh.cache_dir.name == env.cache_dir.name  # same knobs -> same config hash


@pytest.mark.slow
def test_seed_the_generator_rejects_is_skipped_and_remembered(tmp_path, monkeypatch):
    import textworld.generator

    real_make_game, calls = textworld.generator.make_game, []

    def make_game_failing_first(options):  # the generator cannot always fit a quest: simulate it
        calls.append(options.nb_rooms)
        if len(calls) == 1:
            raise RuntimeError("no quest fits")
        return real_make_game(options)

    monkeypatch.setattr(textworld.generator, "make_game", make_game_failing_first)
    opts = {**SMALL, "num_train_games": 1, "num_dev_games": 0, "num_test_games": 0}
    e = make_env("textworld", cache_dir=str(tmp_path), **opts)
    assert len(calls) == 2  # the rejected seed, then the next one
    assert e.game_info("train-0000")["seed"] == game_seed(0, "train", 1)
    again = make_env("textworld", cache_dir=str(tmp_path), **opts)
    assert again.num_generated == 0 and len(calls) == 2


@pytest.mark.slow
def test_plan_progress_follows_the_walkthrough_and_detours(env):
    """info["progress"] = share of the winning plan done: 1/3, 2/3, 1 along a 3-command
    walkthrough; a command that does not shorten the plan leaves it where it was or lowers it."""
    for task in env.tasks("train"):
        env.reset(task)
        walk = env.expert_actions(task)
        seen = []
        for a in walk:
            _, _, done, info = env.step(a)
            seen.append(info["progress"])
        assert seen == pytest.approx([(k + 1) / len(walk) for k in range(len(walk))]) and done and info["won"]
    task = env.tasks("train")[0]
    env.reset(task)
    obs, _, _, info = env.step(env.expert_actions(task)[0])
    assert info["progress"] == pytest.approx(1 / 3)
    # a detour: any admissible command off the plan
    off = next(c for c in info["admissible"] if normalize_command(c) != normalize_command(env.expert_actions(task)[1])
               and not c.startswith(("examine", "look", "inventory")))
    _, _, _, info = env.step(off)
    assert info["progress"] <= 1 / 3 + 1e-9
    off_env = make_env("textworld", cache_dir=env.cache_dir.parent, **{**SMALL, "plan_progress": False})
    off_env.reset(task)
    assert "progress" not in off_env.step(env.expert_actions(task)[0])[3]
    off_env.close()
