"""ScienceWorld (Wang et al., 2022) as a text env: elementary-science tasks in a simulated house.

One ScienceWorld JVM (py4j gateway, ~1.5 s to start) is kept per env object and started on
first use; `close()` shuts it down. Task ids are "<task-name>:<split>:<variation>", e.g.
"find-plant:train:3", where <variation> is ScienceWorld's own variation index and <split> is the
split ScienceWorld assigns it (`getVariationsTrain/Dev/Test`), so the splits never overlap.

Grammar: the command templates are read from the engine's own action handler after a task is
loaded (they differ by task: teleport under "easy", connect/disconnect on electrical tasks), with
every synonym the engine's parser accepts, e.g. "(look at|look on|examine) <obj>",
"(put down|drop) <obj>", "(move|put) <obj> (to|in|into|on) <moveTo>". `parse_action` keeps a
reply's first line when it fits one of them, or when it is a bare number (the answer to the
engine's "Ambiguous request: Please enter the number ..." prompt); "reset task" is left out so a
policy cannot restart its own episode. `get_possible_actions()` lists only one phrasing per
command (no "examine", no "drop"), which is why it is not used.

Validity (the grounding signal) is the engine's own parser verdict: an action is invalid when
ScienceWorld answers "No known action matches that input." or "Unknown action." (its reply to
anything but a listed number while an ambiguity prompt is pending, which also cancels the
prompt). An ambiguity prompt is a valid step and is shown to the policy, which answers with a
number as the gold paths do. We do not use membership in `getValidActionObjectCombinations()`:
on find-* tasks 1 to 5 of the ~10 gold actions per episode are missing from that list (e.g.
"open door to kitchen" when the door is already open), so list membership would call the expert
wrong. The list (~115 strings, 10-45 ms per call) is put in `info["admissible"]` on request.

Score and progress: ScienceWorld's score lies in [0, 1] while running (its Python API reports it
x100) and is negative (-1) when the task has failed (e.g. focusing on the wrong object);
`info["score"]` and `info["progress"]` are it clamped to [0, 1] after every step, the engine's
own sub-goal count, so the increments are ground-truth credit. The episode ends on failure, on
completion, or after `max_steps`.

Expert: the engine's gold path, replayed once on the loaded world to drop the few commands the
engine's own parser refuses (see `_replayed_gold`). It is not cut at the win: the step that
completes a task differs between loads of one variation, and callers stop at `done` anyway.
Its no-op steps stay: under "easy" "open door to X" only answers "The door is already open.",
but each still advances the clock, and dropping them shifts the life-cycle timing enough to lose
identify-life-stages-1/2.
"""

from __future__ import annotations

import functools
import random
import re
from typing import Any

from envs.base import EnvError, first_command_line, register

DEFAULT_TASKS = ("find-living-thing", "find-non-living-thing", "find-plant", "find-animal")
_PARSE_FAILURES = ("No known action matches that input.", "Unknown action.")
_AMBIGUOUS = "Ambiguous request"
_BLOCKED = ("reset task",)  # commands a policy may not send
_TEMPLATE_PART = re.compile(r"\(([^()]*)\)|<(\w+)>")


def compile_grammar(templates: tuple[str, ...]) -> re.Pattern:
    """One regex matching any command of the engine's templates, each written as literal
    alternatives in parentheses and object slots in angle brackets, e.g.
    "(pour) <obj> (in|into|on|to) <moveTo>". Templates whose literal text is in `_BLOCKED` are
    dropped; an object slot matches any non-empty words (the engine resolves the referent)."""
    alternatives = []
    for template in templates:
        parts = _TEMPLATE_PART.findall(template)
        if not parts or " ".join(p[0] for p in parts if p[0]) in _BLOCKED:
            continue
        regex = []
        for words, slot in parts:
            if slot:
                regex.append(r"\S(?:.*\S)?")
            else:
                options = sorted(words.split("|"), key=len, reverse=True)
                regex.append("(?:" + "|".join(re.escape(w.strip()) for w in options) + ")")
        alternatives.append(" ".join(regex))
    if not alternatives:
        raise EnvError(f"scienceworld: no usable command templates in {templates!r}")
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


_compile_cached = functools.lru_cache(maxsize=64)(compile_grammar)


def parse_action(reply: str, templates: tuple[str, ...]) -> str | None:
    """The reply's first command line (`first_command_line`: lower-cased, single spaces, no
    'Action:' prefix or end punctuation) if it fits one of the engine's `templates` whole, or is
    a bare number (an answer to an ambiguity prompt); otherwise None."""
    text = first_command_line(reply)
    if text is None:
        return None
    if text.isdigit() and len(text) <= 3:
        return text
    return text if _compile_cached(tuple(templates)).fullmatch(text) else None


def read_templates(server) -> tuple[str, ...]:
    """The loaded task's command templates, from the engine's action handler (py4j, 0.05-0.4 s),
    in `compile_grammar`'s notation, sorted."""
    handler = server.agentInterface().get().actionHandler()
    templates = []
    for action in handler.getActions():
        triggers = action.triggers()
        for i in range(triggers.length()):
            pattern = triggers.apply(i).pattern()
            parts = []
            for j in range(pattern.length()):
                expr = pattern.apply(j)
                kind = expr.getClass().getSimpleName()
                if kind == "ActionExprText":
                    parts.append(f"({expr.text()})")
                elif kind == "ActionExprOR":
                    words = expr.orElements()
                    parts.append("(" + "|".join(words.apply(k) for k in range(words.length())) + ")")
                elif kind == "ActionExprIdentifier":
                    parts.append(f"<{expr.identifier()}>")
                else:  # an engine version with a new pattern element: fail loudly, not silently
                    raise EnvError(f"scienceworld: unknown action pattern element {kind} in {action.name()!r}")
            templates.append(" ".join(parts))
    return tuple(sorted(templates))


_NAMED = re.compile(r"\b(?:a|an|the)\s+([a-z][a-z0-9 \-]*?)(?=\s*(?:[,.():;\n]|$|\bcontaining\b|\bwhich\b))")
_ARRIVED = ("You move to the ", "You teleport to the ")


def visible_names(text: str) -> list[str]:
    """The object names a look or inventory text shows, as it writes them ("a giant tortoise egg"
    -> "giant tortoise egg", "a oven, which is turned off" -> "oven"), first occurrence first."""
    return list(dict.fromkeys(m.strip() for m in _NAMED.findall(text.lower()) if m.strip()))


def with_display_names(action: str, names: list[str]) -> str:
    """`action` with every run of words that is a shuffled or stuttered form of one of `names`
    written as that name: the engine's gold agent names things by referents such as "egg giant
    tortoise" or "baby baby elephant", which no observation shows ("a giant tortoise egg", "a baby
    elephant"), so a policy cloning them must invent words. Longer names go first; a run must use
    every word of the name and nothing else, so "red box" never becomes part of another name."""
    words = action.split()
    for name in sorted(set(names), key=lambda n: -len(n.split())):
        target = name.split()
        vocab = set(target)
        if len(vocab) < 2:
            continue
        out, i = [], 0
        while i < len(words):
            j = i
            while j < len(words) and words[j] in vocab:
                j += 1
            if j == i:
                out.append(words[i])
                i += 1
                continue
            out += target if set(words[i:j]) == vocab else words[i:j]
            i = j
        words = out
    return " ".join(words)


def completed(server) -> bool:
    """The engine says the task is done and it did not fail (a failure also completes it, at -1)."""
    return bool(server.getCompleted()) and float(server.getScore()) >= 0


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
      find-* classification tasks, 5 to ~16 gold steps).
    - `max_variations_per_task`: at most this many variations per task and split, sampled with
      `seed` (0 or None = all; ScienceWorld has up to ~300 per task).
    - `simplification`: ScienceWorld simplification string, e.g. "easy" (= teleport, open doors,
      self-watering pots, no electrical actions) or "openDoors,openContainers" or "".
    - `max_steps`: episode length limit (the episode is cut, `info["truncated"]` is set).
    - `seed`: fixes which variations are drawn.
    - `list_admissible`: put ScienceWorld's valid action list in `info["admissible"]` (costs
      10-45 ms per step).
    - `look_on_arrival`: after a move that lands ("You move to the kitchen."), append the engine's
      free look at the new room (no step, no time passes). The engine's reply to a move names only
      the room, and the gold paths act on what is there without a `look around` (lifespan-*: `go to
      outside`, then `focus on` an animal no observation has named). Off by default: the
      benchmark's own observations.
    - `gold_display_names`: write the expert's object referents as the observations show them
      (`with_display_names`: "focus on baby baby elephant" -> "focus on baby elephant"), keeping a
      rewritten path only when it replays to the same end as the engine's. Off by default.
    """

    system_prompt = (
        "You are an agent in ScienceWorld, a simulated house with rooms, objects, plants, animals "
        "and substances. Complete the science task given in the first observation. Reply with "
        "exactly one command per turn, for example: look around, look at <thing>, examine <thing>, "
        "go to <room>, teleport to <room>, open <thing>, pick up <thing>, drop <thing>, "
        "move <thing> to <container>, focus on <thing>, use <tool> on <thing>, "
        "pour <thing> into <container>, mix <container>, activate <device>, deactivate <device>, "
        "connect <terminal> to <terminal>, wait1, wait, inventory. Use object names exactly as the "
        "observations write them. When asked which one you meant, reply with its number only. "
        "Focusing on the wrong object fails the task, so only 'focus on' the object the task asks for."
    )

    def __init__(self, task_names: list[str] | tuple[str, ...] = DEFAULT_TASKS,
                 max_variations_per_task: int | None = 10, simplification: str = "easy",
                 max_steps: int = 40, seed: int = 0, list_admissible: bool = False,
                 look_on_arrival: bool = False, gold_display_names: bool = False):
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
        self.look_on_arrival = look_on_arrival
        self.gold_display_names = gold_display_names
        self._sw = None  # the ScienceWorldEnv (JVM), started on first use
        self._splits: dict[str, list[str]] = {}
        self._gold: dict[str, list[str]] = {}
        self._templates: dict[str, tuple[str, ...]] = {}  # task name -> engine command templates
        self._task: str | None = None
        self._task_name = names[0]  # whose templates `parse_action` uses

    # -- engine --------------------------------------------------------------------------
    def _engine(self):
        if self._sw is None:
            try:
                from scienceworld import ScienceWorldEnv
            except ImportError as e:
                raise EnvError("env.name=scienceworld needs `pip install scienceworld` and Java 17+") from e
            self._sw = ScienceWorldEnv("", envStepLimit=10**6)  # we count steps ourselves
        return self._sw

    def _load(self, name: str, variation: int, gold: bool = False) -> None:
        sw = self._engine()
        try:
            sw.load(name, variation, self.simplification, generateGoldPath=gold)
        except ValueError as e:  # bad simplification string
            raise EnvError(f"env.simplification={self.simplification!r}: {e}") from e
        if name not in self._templates:
            self._templates[name] = read_templates(sw.server)

    def templates(self, name: str | None = None) -> tuple[str, ...]:
        """The engine's command templates for task `name` (default: the current task's)."""
        name = name or self._task_name
        if name not in self._templates:
            self._load(name, 0)  # loading ends any running episode
            self._task = None
        return self._templates[name]

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
            self._load(name, 0)
            by_split = {"train": sw.get_variations_train(), "dev": sw.get_variations_dev(),
                        "test": sw.get_variations_test()}
            for split, variations in by_split.items():
                k = self.max_variations_per_task
                if k is not None and k < len(variations):
                    variations = sorted(random.Random(f"{self.seed}:{name}:{split}").sample(variations, k))
                self._splits[split] += [f"{name}:{split}:{v}" for v in variations]
        self._task = None  # loading tasks for the listing ended any running episode

    def parse_action(self, reply: str) -> str | None:
        return parse_action(reply, self.templates())

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
        server = self._sw.server
        # not server.getScore(): it still holds the last episode's score until the first step
        self._task, self._task_name, self.steps, self.won, self.raw_score = task, name, 0, False, 0.0
        obs = f"{server.freeActionTaskDesc().strip()}\n\n{server.freeActionLook().strip()}"
        return obs, self._info(True)

    def _info(self, valid: bool, truncated: bool = False) -> dict[str, Any]:
        score = score_from_raw(self.raw_score)
        info = {"valid": valid, "won": self.won, "score": score, "progress": score,
                "raw_score": self.raw_score, "truncated": truncated}
        if self.list_admissible:
            info["admissible"] = sorted({normalise(a) for a in self._sw.server.getValidActionObjectCombinations()})
        return info

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._task is None:
            raise RuntimeError("scienceworld: call reset(task) before step()")
        self.steps += 1
        command = self.parse_action(action)
        before = score_from_raw(self.raw_score)
        if command is None:
            obs, valid = f"Nothing happens: {action.strip()[:80]!r} is not a ScienceWorld command.", False
        else:
            server = self._sw.server
            obs = str(server.step(command))
            valid = not obs.startswith(_PARSE_FAILURES)
            if self.look_on_arrival and obs.startswith(_ARRIVED):
                obs = f"{obs.strip()}\n\n{server.freeActionLook().strip()}"
            self.raw_score = float(server.getScore())
            self.won = completed(server)
        failed = self.raw_score < 0
        truncated = not (self.won or failed) and self.steps >= self.max_steps
        done = self.won or failed or truncated
        info = self._info(valid, truncated)
        return obs.strip(), info["score"] - before, done, info

    def expert_actions(self, task: str) -> list[str]:
        """ScienceWorld's gold path for `task`, without the steps the engine's own parser
        rejects; play it until `done`, as steps may follow the win. Generating it reloads the
        engine: an episode that has not taken a step yet is reset again (so reset-then-expert
        works), a later one ends."""
        if task not in self._gold:
            name, variation = self._check_task(task)
            running = self._task if self._task is not None and self.steps == 0 else None
            self._load(name, variation, gold=True)
            self._gold[task] = self._replayed_gold()
            if self.gold_display_names:
                self._gold[task] = self._display_gold(name, variation, self._gold[task])
            self._task = None
            if running is not None:
                self.reset(running)
        return list(self._gold[task])

    def _replayed_gold(self) -> list[str]:
        """Replay the just-generated gold path on the freshly loaded world and keep what the
        engine accepts. Needed because the gold agent names objects by randomly chosen
        referents, some of which its parser refuses (on mendelian-genetics-* 2 to 5 steps per
        path, e.g. "move seed pea seed on seed jar containing pea seed to ceramic cup", and the
        "0" answering it). A refused command does nothing and takes no time, so dropping it
        leaves the rest of the path valid; one refused while an ambiguity prompt is pending
        also cancels that prompt, so the prompting command goes too.

        The whole path is kept, past the step where this load completed the task: which step
        completes it varies between loads. On power-component-renewable-vs-nonrenewable-energy
        the last `connect` lit the bulb at once on one load (CI's), so a path cut there lost its
        closing `wait1`, which the next load needed to win (0.58, not done)."""
        server = self._sw.server
        kept: list[str] = []
        pending = False
        for action in server.getGoldActionSequence():
            obs = str(server.step(str(action)))
            if not obs.startswith(_PARSE_FAILURES):
                kept.append(str(action))
            elif pending:
                kept.pop()
            pending = obs.startswith(_AMBIGUOUS)
        return kept

    def _display_gold(self, name: str, variation: int, path: list[str]) -> list[str]:
        """`path` with each action's referents in the names the observations show at that step
        (the room's look and the inventory), replayed on a fresh load; `path` itself unless the
        rewritten one has every action accepted, no new ambiguity prompt, and the same end."""
        server = self._sw.server
        won_before = completed(server)
        self._load(name, variation)
        rewritten = []
        for action in path:
            shown = f"{server.freeActionLook()}\n{server.freeActionInventory()}"
            readable = with_display_names(action, visible_names(shown))
            obs = str(server.step(readable))
            if obs.startswith(_PARSE_FAILURES) or (readable != action and obs.startswith(_AMBIGUOUS)):
                return path
            rewritten.append(readable)
        return rewritten if completed(server) == won_before else path

    def close(self) -> None:
        if self._sw is not None:
            self._sw.close()
            self._sw = None
            self._task = None
