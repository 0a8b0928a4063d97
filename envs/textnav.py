"""Text-Nav: LMRL-Gym's house navigation game (Abdulhai et al. 2023), rebuilt in pure Python.

LMRL-Gym builds Text-Nav with TextWorld: one house of eight rooms (bedroom, living room, dining
room, kitchen, garden, office, bathroom, backyard) joined by passages, tables in the bedroom,
living room and dining room, a closed chest in the office and a closed fridge in the kitchen,
seven small objects on and in them, and one quest: take the stale food from the living-room table
and close it inside the kitchen fridge, starting in a random room. This module keeps that house,
its objects and where they lie, and its command style:

    go north | go south | go east | go west | go to <adjacent room>
    take <object> [from <receptacle>]     drop <object>     look
    put <object> in|on|into <receptacle> (or "insert <object> into <receptacle>")
    open <container>     close <container>

Where it differs from LMRL-Gym's TextWorld game: the quest is drawn per task from every (start
room, object, target receptacle other than the object's own) triple, 8 x 7 x 4 = 224 tasks, so
train/dev/test can be disjoint (LMRL-Gym has the one quest and 8 start rooms); a quest into a
closed container (fridge, chest) is won only once the container is closed again, as LMRL-Gym's
fridge quest is; a receptacle is named by its kind ("table"), meaning the one in the current
room; observations are written by this module in a fixed short form rather than by TextWorld's
grammar; there is no score until the end and no way to lose (LMRL-Gym fails the game when the
food is eaten; there is no `eat` here). A command TextWorld would refuse (no such exit, object not
here, container closed, unknown verb) is an invalid step.

`observed: full` shows the room's name in every observation; `observed: partial` hides it
(LMRL-Gym's `hide_location`), so the agent must tell rooms apart by their exits and furniture.

Ground truth for credit: the quest's sub-goals are checked on the current state, and
`info["progress"]` is the fraction that hold. Into a container: (1) the object is held or in the
target, (2) the target is open or the object is in it, (3) the object is in the target, (4) it is
in the target and the target is closed. Onto a table: (1) held or on the target, (2) on the
target. Walking earns nothing; dropping the object elsewhere or closing the target before the
object is in takes progress back. The `score` is the progress reached (1 when won), so the
outcome is the sum of the per-step increments. The expert walks BFS shortest paths (opening the
object's container first when it is closed), takes the object, walks to the target, opens it if
needed, puts the object in and closes it.
"""

from __future__ import annotations

import re
from collections import deque

from envs.base import EnvError, first_command_line, register
from envs.splits import assign_splits, check_split, split_counts

ROOMS = ("bedroom", "living room", "dining room", "kitchen", "garden", "office", "bathroom", "backyard")
_PASSAGES = (("bedroom", "west", "living room"), ("living room", "west", "dining room"),
             ("dining room", "west", "kitchen"), ("kitchen", "north", "garden"), ("living room", "south", "office"),
             ("office", "east", "bathroom"), ("bedroom", "south", "bathroom"), ("kitchen", "west", "backyard"))
_OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
EXITS: dict[str, dict[str, str]] = {r: {} for r in ROOMS}  # room -> {direction: room}
for _a, _d, _b in _PASSAGES:
    EXITS[_a][_d], EXITS[_b][_OPPOSITE[_d]] = _b, _a
# receptacle id -> (kind, room, is a closable container); ids are "<kind>@<room>"
RECEPTACLES = {"table@bedroom": ("table", "bedroom", False), "table@living room": ("table", "living room", False),
               "table@dining room": ("table", "dining room", False), "chest@office": ("chest", "office", True),
               "fridge@kitchen": ("fridge", "kitchen", True)}
OBJECTS = {"stale food": "table@living room", "fresh food": "table@living room", "bowl": "table@bedroom",
           "coffee cup": "table@dining room", "plate": "table@dining room", "utensils": "chest@office",
           "fruit": "fridge@kitchen"}
_ROOM = "|".join(ROOMS)
_GRAMMAR = [
    (re.compile(r"^go (north|south|east|west)$"), "go {0}"),
    (re.compile(rf"^go to (?:the )?({_ROOM})$"), "go to {0}"),
    (re.compile(r"^take (?:the )?([a-z ]+?) from (?:the )?([a-z]+)$"), "take {0} from {1}"),
    (re.compile(r"^take (?:the )?([a-z ]+)$"), "take {0}"),
    (re.compile(r"^(?:put|place) (?:the )?([a-z ]+?) (?:in|into|on|onto) (?:the )?([a-z]+)$"), "put {0} in {1}"),
    (re.compile(r"^insert (?:the )?([a-z ]+?) into (?:the )?([a-z]+)$"), "put {0} in {1}"),
    (re.compile(r"^(open|close) (?:the )?([a-z]+)$"), "{0} {1}"),
    (re.compile(r"^drop (?:the )?([a-z ]+)$"), "drop {0}"),
    (re.compile(r"^look$"), "look"),
]


def parse_action(reply: str) -> str | None:
    """The first line of a reply as a command of the grammar above, in canonical form ('put X in
    Y' for in/on/into/insert); None when it is none. Whether it can be done is the env's call."""
    text = first_command_line(reply) or ""
    for pattern, form in _GRAMMAR:
        m = pattern.match(text)
        if m:
            return form.format(*m.groups())
    return None


def path(start: str, goal: str) -> list[str]:
    """BFS shortest path between rooms as 'go <direction>' commands (ties: exit order)."""
    prev: dict[str, tuple[str, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        room = queue.popleft()
        for direction, nxt in EXITS[room].items():
            if nxt not in prev:
                prev[nxt] = (room, direction)
                queue.append(nxt)
    moves: list[str] = []
    while goal != start:
        goal, direction = prev[goal]
        moves.append(f"go {direction}")
    return moves[::-1]


@register("textnav")
class TextNavEnv:
    """Options: `observed` (full | partial: hide the room's name), `max_steps` (replies per
    episode, default 25; the longest expert plan is 12), `num_train_tasks`, `num_dev_tasks`,
    `num_test_tasks` (of the 224 (start, object, target) quests, disjoint), `seed`."""

    system_prompt = ("You are in a house. Do the task. One command per turn: go north/south/east/west, take X, "
                     "put X in Y, open X, close X, drop X, look.")

    def __init__(self, observed: str = "full", max_steps: int = 25, num_train_tasks: int = 150,
                 num_dev_tasks: int = 24, num_test_tasks: int = 50, seed: int = 0):
        if observed not in ("full", "partial"):
            raise EnvError(f"textnav: env.observed={observed!r}: choose 'full' or 'partial'")
        if max_steps < 1:
            raise EnvError(f"textnav: env.max_steps={max_steps}: must be >= 1")
        self.observed, self.max_steps = observed, max_steps
        quests = [(start, obj, target) for start in ROOMS for obj in OBJECTS for target in RECEPTACLES
                  if target != OBJECTS[obj]]
        counts = split_counts("textnav", num_train_tasks, num_dev_tasks, num_test_tasks)
        self._splits = assign_splits("textnav", quests, counts, seed)
        self._tasks = {k: v for split in self._splits.values() for k, v in split.items()}
        self._task: str | None = None

    def tasks(self, split: str) -> list[str]:
        return check_split("textnav", self._splits, split)

    def parse_action(self, reply: str) -> str | None:
        return parse_action(reply)

    @staticmethod
    def describe_task(obj: str, target: str) -> str:
        kind, room, container = RECEPTACLES[target]
        src_kind, src_room, _ = RECEPTACLES[OBJECTS[obj]]
        prep = "in" if container else "on"
        return f"Task: put the {obj} from the {src_kind} in the {src_room} {prep} the {kind} in the {room}."

    def _here(self, kind: str) -> str | None:
        rid = f"{kind}@{self.room}"
        return rid if rid in RECEPTACLES else None

    def _observe(self) -> str:
        parts = [f"You are in the {self.room}."] if self.observed == "full" else []
        parts.append(f"Exits: {', '.join(EXITS[self.room])}.")
        for rid, (kind, room, container) in RECEPTACLES.items():
            if room != self.room:
                continue
            inside = [o for o, where in self.where.items() if where == rid]
            if container and rid not in self.open:
                parts.append(f"A {kind} (closed).")
            else:
                parts.append(f"A {kind}" + (f" with {', '.join(inside)}." if inside else " (empty)."))
        floor = [o for o, where in self.where.items() if where == self.room]
        if floor:
            parts.append(f"On the floor: {', '.join(floor)}.")
        if self.held:
            parts.append(f"You carry {', '.join(sorted(self.held))}.")
        return " ".join(parts)

    def _progress(self) -> float:
        in_target = self.where.get(self.obj) == self.target
        held = self.obj in self.held
        if not RECEPTACLES[self.target][2]:
            return ((held or in_target) + in_target) / 2
        closed = self.target not in self.open
        goals = (held or in_target, not closed or in_target, in_target, in_target and closed)
        return sum(goals) / 4

    def _info(self, valid: bool) -> dict:
        progress = self._progress()
        return {"valid": valid, "won": progress == 1.0, "score": progress, "progress": progress}

    def reset(self, task: str) -> tuple[str, dict]:
        if task not in self._tasks:
            raise EnvError(f"textnav has no task {task!r}")
        self._task = task
        self.room, self.obj, self.target = self._tasks[task]
        self.where = dict(OBJECTS)  # object -> receptacle id, or a room name when on the floor
        self.held: set[str] = set()
        self.open: set[str] = set()
        self.steps = 0
        return self.describe_task(self.obj, self.target) + " " + self._observe(), self._info(True)

    def _do(self, cmd: str) -> str:
        """Apply a canonical command; return what happened, or raise ValueError(why not)."""
        verb, _, rest = cmd.partition(" ")
        if cmd == "look":
            return ""
        if verb == "go":
            dest = rest[3:] if rest.startswith("to ") else EXITS[self.room].get(rest)
            if dest not in EXITS[self.room].values():
                raise ValueError(f"you cannot go {rest} from here")
            self.room = dest
            return ""
        if verb in ("open", "close"):
            rid = self._here(rest)
            if rid is None or not RECEPTACLES[rid][2]:
                raise ValueError(f"there is no {rest} to {verb} here")
            if (rid in self.open) == (verb == "open"):
                raise ValueError(f"the {rest} is already {'open' if verb == 'open' else 'closed'}")
            (self.open.add if verb == "open" else self.open.discard)(rid)
            return f"You {verb} the {rest}."
        if verb == "take":
            obj, _, source = rest.partition(" from ")
            where = self.where.get(obj)
            visible = where == self.room or (where in RECEPTACLES and RECEPTACLES[where][1] == self.room
                                             and (not RECEPTACLES[where][2] or where in self.open))
            if obj in self.held or not visible:
                raise ValueError(f"there is no {obj} you can take here")
            if source and source != (RECEPTACLES[where][0] if where in RECEPTACLES else "floor"):
                raise ValueError(f"the {obj} is not in the {source}")
            del self.where[obj]
            self.held.add(obj)
            return f"You take the {obj}."
        if verb == "drop":
            if rest not in self.held:
                raise ValueError(f"you do not carry {rest}")
            self.held.discard(rest)
            self.where[rest] = self.room
            return f"You drop the {rest}."
        obj, _, kind = rest.rpartition(" in ")  # put
        rid = self._here(kind)
        if obj not in self.held:
            raise ValueError(f"you do not carry {obj}")
        if rid is None:
            raise ValueError(f"there is no {kind} here")
        if RECEPTACLES[rid][2] and rid not in self.open:
            raise ValueError(f"the {kind} is closed")
        self.held.discard(obj)
        self.where[obj] = rid
        return f"You put the {obj} {'in' if RECEPTACLES[rid][2] else 'on'} the {kind}."

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self._task is None:
            raise RuntimeError("textnav: call reset(task) before step()")
        self.steps += 1
        cmd = parse_action(action)
        valid = False
        if cmd is None:
            msg = "Nothing happens: that is not a valid command. "
        else:
            try:
                msg = self._do(cmd)
                msg, valid = (msg + " " if msg else ""), True
            except ValueError as e:
                msg = f"Nothing happens: {e}. "
        info = self._info(valid)
        if info["won"]:
            return msg + "You won.", 1.0, True, info
        return msg + self._observe(), 0.0, self.steps >= self.max_steps, info

    def expert_actions(self, task: str) -> list[str]:
        start, obj, target = self._tasks[task]
        source = OBJECTS[obj]
        kind, room, container = RECEPTACLES[target]
        src_kind, src_room, src_container = RECEPTACLES[source]
        actions = path(start, src_room) + ([f"open {src_kind}"] if src_container else []) + [f"take {obj}"]
        actions += path(src_room, room)
        if container:
            return actions + [f"open {kind}", f"put {obj} in {kind}", f"close {kind}"]
        return actions + [f"put {obj} in {kind}"]

    def close(self) -> None:
        pass
