import random

import pytest

from envs import EnvError, check_env, make_env
from envs.scienceworld_env import (compile_grammar, known_task_names, normalise, parse_action,
                                   score_from_raw, split_task_id, visible_names, with_display_names)


# The engine's own templates (as `read_templates` returns them for power-component, "easy";
# test_engine_templates checks this copy against the engine), so parse_action runs without a JVM.
ENGINE_TEMPLATES = (
    "(activate|turn on) <device>", "(close) <door>", "(connect) <terminalA> (to|in|into) <terminalB>",
    "(deactivate|turn off) <device>", "(disconnect) <obj>", "(dunk) <moveTo> (in|into) <moveFrom>",
    "(eat|consume) <food>", "(flush) <device>", "(focus on|focus) <obj>",
    "(go|go through|walk through|move through|go to|walk to|move to|go into|move into) <doorOrLocation>",
    "(inventory)", "(look around|look)", "(look at|look on|examine) <obj>", "(look in) <obj>",
    "(mix|stir) <container>", "(move|put) <obj> (to|in|into|on) <moveTo>", "(open) <door>",
    "(pick up|get|take) <obj>", "(pour) <obj> (in|into|on|to) <moveTo>", "(put down|drop) <obj>",
    "(read) <document>", "(reset task)", "(task)", "(teleport|teleport to|teleport into) <location>",
    "(use) <device> (on|with) <patient>", "(wait)", "(wait1)",
)


def parse(reply):
    return parse_action(reply, ENGINE_TEMPLATES)


def test_parse_action_gold_path_commands():
    assert parse("Action: Focus on  the dove.\nbecause it lives") == "focus on the dove"
    assert parse("\n  `go to kitchen`  ") == "go to kitchen"
    assert parse("> open door to greenhouse") == "open door to greenhouse"
    assert parse("move flower pot 8 to red box") == "move flower pot 8 to red box"
    # the commands the old hand-written verb list refused
    assert parse("examine substance in metal pot") == "examine substance in metal pot"
    assert parse("drop aluminum foil") == "drop aluminum foil"
    assert parse("focus on juvenile elephant in outside") == "focus on juvenile elephant in outside"
    assert parse("pour jug into flower pot 3") == "pour jug into flower pot 3"
    assert parse("use thermometer in inventory on substance in metal pot") == \
        "use thermometer in inventory on substance in metal pot"
    assert parse("connect battery anode to black wire terminal 1") == "connect battery anode to black wire terminal 1"
    assert parse("teleport to kitchen") == "teleport to kitchen"
    assert parse("wait1") == "wait1" and parse("wait") == "wait" and parse("look") == "look"


def test_parse_action_numeric_answers():
    # an answer to "Ambiguous request: Please enter the number ...": the engine judges the number
    assert parse("0") == "0" and parse("Action: 12.") == "12" and parse("3\nthe seed jar one") == "3"
    assert parse("1234") is None  # no prompt lists a thousand candidates
    assert parse("-1") is None and parse("0.5") is None


def test_parse_action_refuses_what_no_template_fits():
    assert parse("reset task") is None  # a policy may not restart its own episode
    assert parse("waiting") is None and parse("gopher") is None  # whole words only
    assert parse("go") is None and parse("move apple") is None  # a template's words, slots empty
    assert parse("move apple to") is None and parse("look at") is None
    assert parse("I think we should go to the kitchen") is None
    assert parse("") is None and parse("  \n ") is None and parse(None) is None
    assert parse("\x00\x01 ~~~ ###") is None and parse("focus on " + "x" * 5000) == "focus on " + "x" * 5000


def test_compile_grammar_drops_reset_and_rejects_empty():
    grammar = compile_grammar(("(reset task)", "(look around|look)"))
    assert grammar.fullmatch("look around") and not grammar.fullmatch("reset task")
    with pytest.raises(EnvError, match="no usable command templates"):
        compile_grammar(("(reset task)",))


def test_small_helpers():
    assert split_task_id("find-plant:train:3") == ("find-plant", "train", 3)
    assert split_task_id("a:b:c:dev:151") == ("a:b:c", "dev", 151)
    for bad in ("find-plant:3", "find-plant:train:x", "x"):
        with pytest.raises(EnvError, match="task id"):
            split_task_id(bad)
    assert [score_from_raw(x) for x in (-1.0, 0.0, 0.25, 1.0, 1.5)] == [0.0, 0.0, 0.25, 1.0, 1.0]
    assert normalise("  Open   Door to Kitchen ") == "open door to kitchen"


LOOK_OUTSIDE = """This outside location is called the outside. Here you see: 
	the agent
	a substance called air
	a baby beaver
	a chameleon egg
	a baby elephant
	a fire pit (containing nothing)
	a counter. On the counter is: a bowl (containing a red apple, a banana), a drawer.
	a oven, which is turned off. 
You also see:
	A door to the foundry (that is open)"""


def test_visible_names_and_display_names():
    names = visible_names(LOOK_OUTSIDE)
    assert {"baby beaver", "chameleon egg", "baby elephant", "fire pit", "bowl", "red apple", "banana",
            "drawer", "oven", "substance called air"} <= set(names)
    # the gold agent's referents (stuttered life stage, stage first) become what the look shows
    assert with_display_names("focus on baby baby elephant", names) == "focus on baby elephant"
    assert with_display_names("focus on egg chameleon", names) == "focus on chameleon egg"
    assert with_display_names("move egg chameleon egg in inventory to red box", names) == \
        "move chameleon egg in inventory to red box"
    assert with_display_names("pick up apple red", names) == "pick up red apple"
    # a run must be exactly a name's words: "baby baby" alone is neither animal, template words stay
    assert with_display_names("focus on baby baby", names) == "focus on baby baby"
    assert with_display_names("open door to foundry", names) == "open door to foundry"
    assert with_display_names("focus on red apple", names) == "focus on red apple"


def test_bad_options_fail_before_starting_java():
    with pytest.raises(EnvError, match="unknown ScienceWorld task 'find-dragon'"):
        make_env("scienceworld", task_names=["find-dragon"])
    with pytest.raises(EnvError, match="max_steps"):
        make_env("scienceworld", max_steps=0)


@pytest.fixture(scope="module")
def env():
    env = make_env("scienceworld", max_variations_per_task=2, max_steps=20, list_admissible=True)
    yield env
    env.close()


@pytest.mark.slow
def test_check_env_gold_paths_win_on_every_split(env):
    for split in ("train", "dev", "test"):
        tasks = env.tasks(split)
        assert len(tasks) == 8 and all(t.split(":")[1] == split for t in tasks)
        check_env(env, split, max_tasks=3)  # every task's gold path: the 30-task test below


@pytest.mark.slow
def test_gold_rewards_sum_to_score_and_progress_is_the_engine_score(env):
    task = env.tasks("train")[4]  # a find-plant variation
    obs, info = env.reset(task)
    assert obs.startswith("Task Description:") and "find a(n) plant" in obs
    assert info == {**info, "valid": True, "won": False, "score": 0.0, "progress": 0.0}
    assert info["admissible"] and "look around" in info["admissible"]
    expert = env.expert_actions(task)
    # the no-op door steps stay: each one takes a tick, and the life-stage tasks need the timing
    assert expert[0].startswith("open door to")
    total, progress = 0.0, [info["progress"]]
    for action in expert:
        obs, reward, done, info = env.step(action)
        assert info["valid"] and info["progress"] == info["score"] == info["raw_score"]
        total += reward
        progress.append(info["progress"])
        if done:
            break
    assert info["won"] and info["score"] == 1.0 and total == pytest.approx(1.0)
    # ScienceWorld's sub-goals for find-plant: move, focus, pick up, reach the box room, move in
    assert progress == sorted(progress) and len(set(progress)) >= 4 and progress[-1] == 1.0


@pytest.mark.slow
def test_engine_judges_validity_and_ambiguity_prompts(env):
    env.reset(env.tasks("dev")[0])
    obs, reward, done, info = env.step("please fly away")  # no template fits
    assert not info["valid"] and not done and reward == 0.0 and "not a ScienceWorld command" in obs
    obs, reward, done, info = env.step("look at unicorn")  # a template, but no such object
    assert not info["valid"] and not done and reward == 0.0 and obs == "No known action matches that input."
    obs, _, _, info = env.step("0")  # a number with no prompt pending
    assert not info["valid"] and obs == "No known action matches that input."
    obs, _, _, info = env.step("teleport to hallway")  # six doors
    assert info["valid"] and obs == "You teleport to the hallway."
    obs, _, _, info = env.step("open door")  # ambiguous: the prompt is shown, a valid step
    assert info["valid"] and obs.startswith("Ambiguous request") and "\n0:" in obs and "\n1:" in obs
    obs, _, _, info = env.step("look around")  # anything but a number cancels the prompt
    assert not info["valid"] and obs.startswith("Unknown action.")
    env.step("open door")
    obs, _, _, info = env.step("99")  # no such candidate
    assert not info["valid"] and obs.startswith("Unknown action.")
    env.step("open door")
    obs, _, _, info = env.step("Action: 1")  # the engine's answer to a listed number
    assert info["valid"] and obs.startswith("The door is")
    obs, _, done, info = env.step("examine agent")  # a synonym only the engine's grammar lists
    assert info["valid"] and not done and obs
    obs, _, done, info = env.step("focus on agent")  # wrong focus fails the task
    assert info["valid"] and done and not info["won"] and info["score"] == 0.0 and info["raw_score"] < 0
    assert info["progress"] == 0.0


@pytest.mark.slow
def test_engine_templates(env):
    electrical = {"(connect) <terminalA> (to|in|into) <terminalB>", "(disconnect) <obj>"}
    assert env.templates("power-component") == ENGINE_TEMPLATES
    assert set(env.templates("find-plant")) == set(ENGINE_TEMPLATES) - electrical  # "easy" drops them
    assert env.parse_action("examine the red box") == "examine the red box"
    assert env.parse_action("reset task") is None and env.parse_action("12") == "12"


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


# mendelian-genetics-known-plant is not reproducible in the engine: the same actions on the same
# variation give different observations on each load (its plants' genotypes and the order it
# lists objects in change; seeding scala.util.Random does not fix it), and on some loads 2 to 6
# gold steps then name a seed that is not there. We measured it on 3 of 6 replays of one path;
# unknown-plant on 0 of 6, kept here as it shares the code. Both must still win.
UNREPRODUCIBLE = {"mendelian-genetics-known-plant": 8, "mendelian-genetics-unknown-plant": 8}


def _replay_first_train_variations(names):
    """Replay the gold path of each task's first train variation through the wrapper on one JVM;
    per task: (task, won, refused actions, how the replay ended: steps, score, last 3 steps)."""
    env = make_env("scienceworld", task_names=names, max_variations_per_task=None, max_steps=400)
    try:
        first = {}
        for task in env.tasks("train"):
            first.setdefault(split_task_id(task)[0], task)
        results = []
        for task in first.values():
            expert = env.expert_actions(task)
            env.reset(task)
            refused, done, info, steps = [], False, {}, []
            for action in expert:
                obs, _, done, info = env.step(action)
                steps.append((action, obs[:80]))
                if not info["valid"]:
                    refused.append((action, obs[:60]))
                if done:
                    break
            ending = {"steps": f"{len(steps)} of {len(expert)}", "score": info.get("raw_score"), "last": steps[-3:],
                      "past_win": len(expert) - len(steps)}
            results.append((task, done and info["won"], refused, ending))
        return results
    finally:
        env.close()


@pytest.mark.slow
def test_gold_path_of_every_task_wins_with_every_action_valid():
    from concurrent.futures import ThreadPoolExecutor

    names = known_task_names()
    assert len(names) == 30
    # two JVMs, one per core; the two slow mendelian tasks go to different ones
    halves = [names[0::2], names[1::2]]
    assert all(any(n.startswith("mendelian") for n in half) for half in halves)
    with ThreadPoolExecutor(2) as pool:
        results = [r for part in pool.map(_replay_first_train_variations, halves) for r in part]
    assert sorted(split_task_id(t)[0] for t, *_ in results) == names
    # how a lost replay ended goes into the failure message. power-component-renewable-vs-nonrenewable-
    # energy lost twice (once in CI, "23 of 23", 0.58): the load that made its path completed the
    # task one step early, and the path was then cut there, without the closing wait1
    assert {t: ending for t, won, _, ending in results if not won} == {}
    # so the path is no longer cut at the win: these tasks' gold agents measure the result after it
    past_win = {split_task_id(t)[0] for t, _, _, ending in results if ending["past_win"] > 0}
    assert {"boil", "freeze", "change-the-state-of-matter-of"} <= past_win
    refused = {t: r for t, _, r, _ in results if r}
    for task, actions in list(refused.items()):
        if len(actions) <= UNREPRODUCIBLE.get(split_task_id(task)[0], 0):
            del refused[task]
    assert refused == {}


@pytest.mark.slow
def test_readable_demos_name_only_what_the_policy_was_shown():
    """lifespan-*: the engine's reply to `go to outside` names no animal and its gold agent then
    focuses on "egg giant tortoise"; with the two options every object a demo acts on was shown."""
    opts = dict(task_names=["lifespan-longest-lived", "lifespan-shortest-lived"], max_variations_per_task=4,
                max_steps=12)
    plain = make_env("scienceworld", **opts)
    readable = make_env("scienceworld", **opts, look_on_arrival=True, gold_display_names=True)
    try:
        unseen, rewritten = {}, 0
        for task in readable.tasks("train"):
            gold, demo = plain.expert_actions(task), readable.expert_actions(task)
            assert len(gold) == len(demo)
            rewritten += gold != demo
            obs, _ = readable.reset(task)
            seen, info = obs, {}
            for action in demo:
                if action.startswith("focus on ") and action[len("focus on "):] not in seen:
                    unseen[task] = action
                obs, _, done, info = readable.step(action)
                seen += "\n" + obs
                if done:
                    break
            assert info["won"], (task, demo)
        assert unseen == {} and rewritten >= 2
        plain.reset(readable.tasks("train")[0])
        assert plain.step("teleport to outside")[0] == "You teleport to the outside."
        readable.reset(readable.tasks("train")[0])
        obs = readable.step("teleport to outside")[0]
        assert obs.startswith("You teleport to the outside.\n\nThis outside location is called the outside. Here you see:")
    finally:
        plain.close()
        readable.close()
