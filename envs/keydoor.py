"""KeyDoor: a fast pure-Python key-and-door navigation task with an oracle and known progress.

The agent stands in a `size` x `size` grid of rooms. It must walk to the key, `take key`, walk to
the door and `open door`. Observations are relative ("The key is 2 steps north and 1 step
east."), so the optimal policy is a function of the last observation and a small model can learn
it; the horizon grows with `size` (the oracle needs up to 4*(size-1)+2 steps).

Ground truth for credit assignment: `info["progress"]` is 0.5 while the key is held and 1.0 once
the door is open, so only `take key` (+0.5), `open door` (+0.5) and `drop key` (-0.5, a trap the
oracle never uses) change progress; every move makes none. The outcome arrives only at the end:
the final `score` is the progress reached (1 when won, 0.5 when the episode ends holding the key),
so the outcome is exactly the sum of the true per-step increments and they can be identified from
outcomes alone (were the score 1-if-won, `take key` and `open door` could not be told apart).

With `doors=2` (or more) there are several coloured doors and only one of them opens; the
observation does not say which. The oracle knows (like ALFWorld's expert knows where the object
lies), so behaviour cloning cannot learn which door to try first, and its demos never show what to
do after trying a door that does not open (the door is then described as jammed). Recovering from
that is left to reinforcement learning (an imitation gap; see the README on what RL achieved).

With `distractors=N` (1..4) N objects (a coin, a lamp, ...) lie in other rooms and every
observation says where they are; `take coin` etc. are valid but change no progress, so the agent
must pick the key's sentence out of a longer observation and a taken distractor is a wasted step
(a setting with headroom for RL; see the README). With 0 (the default) nothing changes.

Task ids are "<split>-<index>"; each names a distinct layout (agent, key and door positions, and
which door opens), drawn without replacement from one seeded stream, so train/dev/test never
share a layout.
"""

from __future__ import annotations

import math
import random
import re

from envs.base import EnvError, first_command_line, register

ACTIONS = ("go north", "go south", "go east", "go west", "take key", "drop key", "open door")
_MOVES = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}
_ACTION_RE = re.compile(r"^(go|take|drop|open)\s+[a-z]+$")
_COLOURS = ("red", "blue", "green", "yellow")
_OBJECTS = ("coin", "lamp", "book", "cup")  # distractors: can be taken, never help
_PROMPT = ("You are an agent in a grid of rooms. Find the key, take it, {goal}Reply with exactly one action per "
           "turn: go north, go south, go east, go west, take key, drop key, open door.")


def parse_action(reply: str) -> str | None:
    """First non-empty line, minus an optional 'Action:' prefix, lower-cased; None if it is not
    of the form '<verb> <word>' with a known verb."""
    text = first_command_line(reply)
    return text if text and _ACTION_RE.match(text) else None


def walk(pos: tuple[int, int], target: tuple[int, int]) -> list[str]:
    """The oracle's moves from pos to target: rows first, then columns."""
    dr, dc = target[0] - pos[0], target[1] - pos[1]
    return ["go south" if dr > 0 else "go north"] * abs(dr) + ["go east" if dc > 0 else "go west"] * abs(dc)


def _describe(name: str, dr: int, dc: int) -> str:
    if dr == 0 and dc == 0:
        return f"The {name} is here."
    parts = []
    if dr:
        parts.append(f"{abs(dr)} step{'s' if abs(dr) > 1 else ''} {'south' if dr > 0 else 'north'}")
    if dc:
        parts.append(f"{abs(dc)} step{'s' if abs(dc) > 1 else ''} {'east' if dc > 0 else 'west'}")
    return f"The {name} is {' and '.join(parts)}."


@register("keydoor")
class KeyDoorEnv:
    """Options: `size` (grid side, >= 2), `doors` (1..4; with more than one, only one opens and
    the agent is not told which), `distractors` (0..4 useless objects lying about), `max_steps` (default 4*size+2, plus 2*size per extra door),
    `num_train_tasks`, `num_dev_tasks`, `num_test_tasks`, `seed` (fixes the layouts)."""

    system_prompt = _PROMPT.format(goal="walk to the door and open it. ")

    def __init__(self, size: int = 3, doors: int = 1, max_steps: int | None = None, num_train_tasks: int = 64,
                 num_dev_tasks: int = 16, num_test_tasks: int = 32, seed: int = 0, distractors: int = 0):
        if size < 2:
            raise EnvError(f"env.size={size}: must be >= 2")
        if not 1 <= doors <= len(_COLOURS) or doors + 2 > size**2:
            raise EnvError(f"env.doors={doors}: must be in 1..{min(len(_COLOURS), size**2 - 2)} for size={size}")
        if not 0 <= distractors <= len(_OBJECTS) or doors + 2 + distractors > size**2:
            raise EnvError(f"env.distractors={distractors}: must be in 0..{len(_OBJECTS)} and leave room for the "
                           f"agent, key and {doors} door(s) in a {size}x{size} grid")
        n_layouts = doors * math.perm(size**2, 2 + doors + distractors)
        wanted = num_train_tasks + num_dev_tasks + num_test_tasks
        if wanted > n_layouts:
            raise EnvError(f"keydoor size={size} has only {n_layouts} layouts, {wanted} tasks asked")
        self.size = size
        self.doors = doors
        self.distractors = distractors
        self.max_steps = max_steps or 4 * size + 2 + 2 * size * (doors - 1)
        if doors > 1:
            self.system_prompt = _PROMPT.format(
                goal=f"walk to a door and open it. There are {doors} doors and only one of them opens. ")
        if distractors:
            self.system_prompt += " Other objects lie about (take <object> picks one up); they do not help."
        cells = [(r, c) for r in range(size) for c in range(size)]
        rng = random.Random(seed)
        seen: set[tuple] = set()
        layouts: list[tuple] = []
        while len(layouts) < wanted:
            layout = tuple(rng.sample(cells, 2 + doors + distractors))  # agent, key, door(s), distractors
            if doors > 1:
                layout += (rng.randrange(doors),)  # which door opens
            if layout not in seen:
                seen.add(layout)
                layouts.append(layout)
        counts = {"train": num_train_tasks, "dev": num_dev_tasks, "test": num_test_tasks}
        self._layouts: dict[str, tuple] = {}
        start = 0
        for split, n in counts.items():
            for i in range(n):
                self._layouts[f"{split}-{i}"] = layouts[start + i]
            start += n
        self._splits = {s: [f"{s}-{i}" for i in range(n)] for s, n in counts.items()}
        self._task: str | None = None

    def tasks(self, split: str) -> list[str]:
        if split not in self._splits:
            raise EnvError(f"keydoor split {split!r}: choose one of {sorted(self._splits)}")
        return list(self._splits[split])

    def parse_action(self, reply: str) -> str | None:
        return parse_action(reply)

    def _door_name(self, i: int) -> str:
        if self.doors == 1:
            return "door"
        return f"{_COLOURS[i]} door" + (" (jammed)" if i in self.jammed else "")

    def _observe(self) -> str:
        doors = " ".join(_describe(self._door_name(i), d[0] - self.pos[0], d[1] - self.pos[1])
                         for i, d in enumerate(self.door_cells))
        for name, cell in self.objects.items():
            if name not in self.held:
                doors += " " + _describe(name, cell[0] - self.pos[0], cell[1] - self.pos[1])
        if self.has_key:
            return "You hold the key. " + doors
        return _describe("key", self.key[0] - self.pos[0], self.key[1] - self.pos[1]) + " " + doors

    def _info(self, valid: bool) -> dict:
        progress = 1.0 if self.won else (0.5 if self.has_key else 0.0)
        # the state as a key: every observation but the first opens with the last action's feedback
        # ("You walk north." / "Nothing happens: ..."), so equal states read differently
        state = (f"at {self.pos} key {'held' if self.has_key else self.key} jammed {sorted(self.jammed)} "
                 f"held {sorted(self.held)} won {self.won}")
        return {"valid": valid, "won": self.won, "score": progress, "progress": progress, "state": state}

    def reset(self, task: str) -> tuple[str, dict]:
        if task not in self._layouts:
            raise EnvError(f"keydoor has no task {task!r}")
        self._task = task
        layout = self._layouts[task]
        self.pos, self.key = layout[0], layout[1]
        self.door_cells = layout[2:2 + self.doors]
        self.door = self.door_cells[layout[-1] if self.doors > 1 else 0]  # the one that opens
        self.jammed: set[int] = set()
        self.objects = dict(zip(_OBJECTS, layout[2 + self.doors : 2 + self.doors + self.distractors]))
        self.held: set[str] = set()  # distractors picked up
        self.has_key, self.won, self.steps = False, False, 0
        return self._observe(), self._info(True)

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self._task is None:
            raise RuntimeError("keydoor: call reset(task) before step()")
        self.steps += 1
        action = parse_action(action) or action.strip().lower()
        verb, _, obj = action.partition(" ")
        msg = None
        if verb == "go" and obj in _MOVES:
            r, c = self.pos[0] + _MOVES[obj][0], self.pos[1] + _MOVES[obj][1]
            if 0 <= r < self.size and 0 <= c < self.size:
                self.pos = (r, c)
                msg = f"You walk {obj}."
            else:
                reason = f"there is a wall to the {obj}"
        elif action == "take key":
            if not self.has_key and self.pos == self.key:
                self.has_key = True
                msg = "You took the key."
            else:
                reason = "you hold the key already" if self.has_key else "the key is not here"
        elif action == "drop key":
            if self.has_key:
                self.has_key, self.key = False, self.pos
                msg = "You dropped the key."
            else:
                reason = "you do not hold the key"
        elif action == "open door":
            here = self.door_cells.index(self.pos) if self.pos in self.door_cells else None
            if self.has_key and self.pos == self.door:
                self.won = True
                msg = "You opened the door. You won."
            elif self.has_key and here is not None and here not in self.jammed:
                # a legitimate try that reveals information: valid, but no progress
                self.jammed.add(here)
                msg = f"The {_COLOURS[here]} door does not open: it is jammed."
            elif not self.has_key:
                reason = "you do not hold the key"
            else:
                reason = "the door is not here" if here is None else f"the {_COLOURS[here]} door is jammed"
        elif verb == "take" and obj in self.objects:
            if obj not in self.held and self.pos == self.objects[obj]:
                self.held.add(obj)
                msg = f"You took the {obj}."  # valid, but no progress
            else:
                reason = f"you hold the {obj} already" if obj in self.held else f"the {obj} is not here"
        else:
            reason = f"{action!r} is not a valid action"
        valid = msg is not None
        obs = (msg if valid else f"Nothing happens: {reason}.") + (" " + self._observe() if not self.won else "")
        done = self.won or self.steps >= self.max_steps
        return obs, 1.0 if self.won else 0.0, done, self._info(valid)

    def expert_actions(self, task: str) -> list[str]:
        """The oracle: walk to the key (rows first), take it, walk to the door that opens (it knows
        which), open it."""
        layout = self._layouts[task]
        pos, key = layout[0], layout[1]
        door = layout[2 + (layout[-1] if self.doors > 1 else 0)]
        actions: list[str] = []
        for target, finish in ((key, "take key"), (door, "open door")):
            actions += walk(pos, target) + [finish]
            pos = target
        return actions

    def close(self) -> None:
        pass
