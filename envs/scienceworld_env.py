"""ScienceWorld (Wang et al., 2022) as a text env: elementary-science tasks in a simulated house.

One ScienceWorld JVM (py4j gateway, ~1.5 s to start) is kept per env object and started on
first use; `close()` shuts it down. Task ids are "<task-name>:<split>:<variation>", e.g.
"find-plant:train:3", where <variation> is ScienceWorld's own variation index and <split> is the
split ScienceWorld assigns it (`getVariationsTrain/Dev/Test`), so the splits never overlap.

Validity (the grounding signal) is the engine's own parser verdict: an action is invalid when
ScienceWorld answers "No known action matches that input." or "Unknown action.". We do not use
membership in `getValidActionObjectCombinations()` for this: measured on find-* tasks with the
"easy" simplification, 1 to 5 of the ~10 gold actions per episode are missing from that list
(e.g. "open door to kitchen" when the door is already open, or the disambiguated
"move egg butterfly egg in inventory to red box"), so list membership would call the expert
wrong. The list (~115 strings, 10-45 ms per call) is put in `info["admissible"]` on request.

An ambiguous action ("Ambiguous request: Please enter the number ...") is resolved to the first
candidate ("0"), as the ScienceWorld baselines do, so an episode never waits on a number.

Score: ScienceWorld's score lies in [0, 1] while running and is negative (-1) when the task has
failed (e.g. focusing on the wrong object); `info["score"]` clamps it to [0, 1], and the episode
ends on failure, on completion, or after `max_steps`.
"""

from __future__ import annotations

import random
import re
from typing import Any

from envs.base import EnvError, first_command_line, register

DEFAULT_TASKS = ("find-living-thing", "find-non-living-thing", "find-plant", "find-animal")
# Command verbs the engine knows (from `get_possible_actions()` plus the electrical ones);
# "reset task" is left out on purpose so a policy cannot restart its own episode.
VERBS = ("activate", "close", "connect", "deactivate", "disconnect", "dunk", "eat", "flush",
         "focus on", "go", "inventory", "look around", "look at", "look in", "mix", "move", "open",
         "pick up", "pour", "put down", "read", "task", "teleport", "use", "wait1", "wait")
_VERB_RE = re.compile(r"^(" + "|".join(re.escape(v) for v in VERBS) + r")\b")
_PARSE_FAILURES = ("No known action matches that input.", "Unknown action.")
_AMBIGUOUS = "Ambiguous request"


def parse_action(reply: str) -> str | None:
    """First non-empty line of the reply, minus an optional 'Action:' prefix and surrounding
    quotes/punctuation, lower-cased with single spaces; None unless it starts with a known verb."""
    text = first_command_line(reply)
    return text if text and _VERB_RE.match(text) else None


def normalise(text: str) -> str:
    """Lower-case, single spaces: the form actions are compared in."""
    return re.sub(r"\s+", " ", text.strip().lower())


def score_from_raw(raw: float) -> float:
    """ScienceWorld's score (in [0, 1], or negative after a failure) clamped to [0, 1]."""
    return min(1.0, max(0.0, float(raw)))


def split_task_id(task: str) -> tuple[str, str, int]:
    """'find-plant:train:3' -> ('find-plant', 'train', 3); EnvError when malformed."""
    parts = task.rsplit(":", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        raise EnvError(f"scienceworld task id {task!r}: expected '<task-name>:<split>:<variation>'")
    return parts[0], parts[1], int(parts[2])


def known_task_names() -> list[str]:
    """All ScienceWorld task names, read from the package's task table (no JVM needed)."""
    from scienceworld.constants import ID2TASK

    return sorted(ID2TASK.values())


@register("scienceworld")
class ScienceWorldTextEnv:
    """Options:
    - `task_names`: ScienceWorld task names to draw tasks from (default: the four short
      find-* classification tasks, 3-12 gold steps each).
    - `max_variations_per_task`: at most this many variations per task and split, sampled with
      `seed` (0 or None = all; ScienceWorld has up to ~300 per task).
    - `simplification`: ScienceWorld simplification string, e.g. "easy" (= teleport, open doors,
      self-watering pots, no electrical actions) or "openDoors,openContainers" or "".
    - `max_steps`: episode length limit (the episode is cut, `info["truncated"]` is set).
    - `seed`: fixes which variations are drawn.
    - `list_admissible`: put ScienceWorld's valid action list in `info["admissible"]` (costs
      10-45 ms per step).
    """

    system_prompt = (
        "You are an agent in ScienceWorld, a simulated house with rooms, objects, plants, animals "
        "and substances. Complete the science task given in the first observation. Reply with "
        "exactly one command per turn, for example: look around, look at <thing>, go to <room>, "
        "open <thing>, pick up <thing>, put down <thing>, move <thing> to <container>, "
        "focus on <thing>, use <tool> on <thing>, pour <thing> in <container>, mix <container>, "
        "activate <device>, deactivate <device>, wait, inventory. Use object names exactly as the "
        "observations write them. Focusing on the wrong object fails the task, so only "
        "'focus on' the object the task asks for."
    )

    def __init__(self, task_names: list[str] | tuple[str, ...] = DEFAULT_TASKS,
                 max_variations_per_task: int | None = 10, simplification: str = "easy",
                 max_steps: int = 40, seed: int = 0, list_admissible: bool = False):
        names = list(task_names)
        allowed = known_task_names()
        for name in names:
            if name not in allowed:
                raise EnvError(f"env.task_names: unknown ScienceWorld task {name!r}; choose from {allowed}")
        if not names:
            raise EnvError("env.task_names: give at least one ScienceWorld task name")
        if max_steps < 1:
            raise EnvError(f"env.max_steps={max_steps}: must be >= 1")
        self.task_names = names
        self.max_variations_per_task = max_variations_per_task or None
        self.simplification = simplification
        self.max_steps = max_steps
        self.seed = seed
        self.list_admissible = list_admissible
        self._sw = None  # the ScienceWorldEnv (JVM), started on first use
        self._splits: dict[str, list[str]] = {}
        self._gold: dict[str, list[str]] = {}
        self._task: str | None = None

    # -- engine --------------------------------------------------------------------------
    def _engine(self):
        if self._sw is None:
            try:
                from scienceworld import ScienceWorldEnv
            except ImportError as e:
                raise EnvError("env.name=scienceworld needs `pip install scienceworld` and Java 17+") from e
            self._sw = ScienceWorldEnv("", envStepLimit=10**6)  # we count steps ourselves
        return self._sw

    def _load(self, name: str, variation: int, gold: bool = True) -> None:
        sw = self._engine()
        try:
            sw.load(name, variation, self.simplification, generateGoldPath=gold)
        except ValueError as e:  # bad simplification string
            raise EnvError(f"env.simplification={self.simplification!r}: {e}") from e

    # -- protocol ------------------------------------------------------------------------
    def tasks(self, split: str) -> list[str]:
        if split not in ("train", "dev", "test"):
            raise EnvError(f"scienceworld split {split!r}: choose one of ['dev', 'test', 'train']")
        if not self._splits:
            self._list_splits()
        return list(self._splits[split])

    def _list_splits(self) -> None:
        sw = self._engine()
        self._splits = {"train": [], "dev": [], "test": []}
        for name in self.task_names:
            self._load(name, 0, gold=False)
            by_split = {"train": sw.get_variations_train(), "dev": sw.get_variations_dev(),
                        "test": sw.get_variations_test()}
            for split, variations in by_split.items():
                k = self.max_variations_per_task
                if k is not None and k < len(variations):
                    variations = sorted(random.Random(f"{self.seed}:{name}:{split}").sample(variations, k))
                self._splits[split] += [f"{name}:{split}:{v}" for v in variations]
        self._task = None  # loading tasks for the listing ended any running episode

    def parse_action(self, reply: str) -> str | None:
        return parse_action(reply)

    def _check_task(self, task: str) -> tuple[str, int]:
        name, split, variation = split_task_id(task)
        if name not in self.task_names:
            raise EnvError(f"scienceworld task {task!r}: {name!r} is not in env.task_names {self.task_names}")
        if task not in self.tasks(split):
            raise EnvError(f"scienceworld task {task!r}: variation {variation} is not one of this env's {split} tasks")
        return name, variation

    def reset(self, task: str) -> tuple[str, dict[str, Any]]:
        name, variation = self._check_task(task)
        self._load(name, variation)
        server = self._engine().server
        self._gold[task] = self._gold_path()
        self._task, self.steps, self.won, self.raw_score = task, 0, False, 0.0
        obs = f"{server.freeActionTaskDesc().strip()}\n\n{server.freeActionLook().strip()}"
        return obs, self._info(True)

    def _info(self, valid: bool, truncated: bool = False) -> dict[str, Any]:
        info = {"valid": valid, "won": self.won, "score": score_from_raw(self.raw_score),
                "raw_score": self.raw_score, "truncated": truncated}
        if self.list_admissible:
            info["admissible"] = sorted({normalise(a) for a in self._sw.server.getValidActionObjectCombinations()})
        return info

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._task is None:
            raise RuntimeError("scienceworld: call reset(task) before step()")
        self.steps += 1
        command = parse_action(action)
        before = score_from_raw(self.raw_score)
        if command is None:
            obs, valid = f"Nothing happens: {action.strip()[:80]!r} is not a ScienceWorld command.", False
        else:
            server = self._sw.server
            obs = str(server.step(command))
            if obs.startswith(_AMBIGUOUS):
                obs = str(server.step("0"))
            valid = not obs.startswith(_PARSE_FAILURES)
            self.raw_score = float(server.getScore())
            self.won = bool(server.getCompleted()) and self.raw_score >= 0
        failed = self.raw_score < 0
        truncated = not (self.won or failed) and self.steps >= self.max_steps
        done = self.won or failed or truncated
        info = self._info(valid, truncated)
        return obs.strip(), info["score"] - before, done, info

    def _gold_path(self) -> list[str]:
        """The loaded task's gold path. With doors opened by the simplification, its
        "open door to X" steps are no-ops ("The door is already open."), so they are dropped."""
        gold = [str(a) for a in self._sw.server.getGoldActionSequence()]
        if {"easy", "openDoors"} & set(self.simplification.split(",")):
            gold = [a for a in gold if not a.startswith("open door to ")]
        return gold

    def expert_actions(self, task: str) -> list[str]:
        """ScienceWorld's gold path for `task` (it may run on after the task is complete).
        Loading a task other than the current one ends the running episode."""
        if task not in self._gold:
            name, variation = self._check_task(task)
            self._load(name, variation)
            self._gold[task] = self._gold_path()
            self._task = None
        return list(self._gold[task])

    def close(self) -> None:
        if self._sw is not None:
            self._sw.close()
            self._sw = None
            self._task = None
