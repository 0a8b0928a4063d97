"""Blocks: the classic blocks world (stack lettered blocks to match a goal), pure Python.

`num_blocks` blocks (A, B, C, ...) stand in stacks on a table. One move takes a clear block (one
with nothing on it) and puts it on the table or on another clear block:
`move a onto b`, `move a onto table` (also `put a on b`, `stack block a on block b`, ...). Each observation lists
every block's support and the goal, e.g.

    Now: A is on the table. B is on A. C is on the table.
    Goal: A on the table, B on C, C on the table.

Every start/goal pair of distinct arrangements is a task (3 blocks: 13 arrangements, 156 tasks;
4 blocks: 73 and 5,256); task ids "<split>-<i>" name distinct tasks drawn by one seeded shuffle,
so the splits never share one. Moving a block that is not clear, onto a block that is not clear,
onto itself or from the table to the table is an invalid step that changes nothing.

Ground truth for credit: a block is *well placed* when it stands on what the goal says and
everything under it is well placed. Well-placed blocks never have to move again, so their count
only grows along a good plan, and the moves that park a block on the table to free another one add
nothing although they are needed (like KeyDoor's walking steps). With w_t the well-placed count
after step t, `info["progress"]` = max(0, (w_t - w_0) / (num_blocks - w_0)): 1 exactly when the
goal is reached, and breaking a well-placed block takes its share back. The episode's `score` is
the progress reached, so the outcome is the sum of the per-step increments.

The expert (`expert_actions`) is the usual greedy planner: put a block onto its goal support
whenever that support is well placed and clear, otherwise park a clear misplaced block on the
table; it needs at most 2 x num_blocks moves, the default step limit.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

from envs.base import EnvError, first_command_line, register
from envs.splits import assign_splits, check_split, split_counts

TABLE = "table"
_ACTION_RE = re.compile(r"^(?:move|put|stack|place) (?:block )?([a-z])(?: block)? (?:on|onto|to) (?:the )?(?:block )?([a-z]|table)$")
_PROMPT = ("You are stacking lettered blocks on a table. A block is clear when nothing is on it. Each turn, "
           "move one clear block onto the table or onto another clear block, until the blocks are arranged as "
           "the goal says. Reply with exactly one action: move <block> onto <block>, or move <block> onto table.")

# an arrangement: for each block (in letter order) what it stands on: TABLE or another block's letter
Arrangement = tuple[str, ...]


def parse_action(reply: str) -> str | None:
    """'move x onto y' (y a letter or 'table') from the first line of a reply; None otherwise."""
    m = _ACTION_RE.match(first_command_line(reply) or "")
    return f"move {m.group(1)} onto {m.group(2)}" if m else None


@lru_cache(maxsize=None)
def arrangements(n: int) -> tuple[Arrangement, ...]:
    """Every arrangement of n blocks into stacks (ordered stacks, unordered set of stacks)."""
    letters = string.ascii_uppercase[:n]
    out: set[Arrangement] = set()

    def grow(stacks: list[list[str]], i: int) -> None:
        if i == n:
            on = {}
            for stack in stacks:
                for below, block in zip([TABLE] + stack, stack):
                    on[block] = below
            out.add(tuple(on[b] for b in letters))
            return
        block = letters[i]
        for stack in stacks:  # on top of a stack, or anywhere inside it
            for pos in range(len(stack) + 1):
                stack.insert(pos, block)
                grow(stacks, i + 1)
                stack.pop(pos)
        stacks.append([block])
        grow(stacks, i + 1)
        stacks.pop()

    grow([], 0)
    return tuple(sorted(out))


def clear_blocks(state: Arrangement) -> list[str]:
    letters = string.ascii_uppercase[:len(state)]
    return [b for b in letters if b not in state]


def well_placed(state: Arrangement, goal: Arrangement) -> set[str]:
    """Blocks on their goal support with everything below them well placed too."""
    letters = string.ascii_uppercase[:len(state)]
    idx = {b: i for i, b in enumerate(letters)}
    done: dict[str, bool] = {}

    def ok(b: str) -> bool:
        if b not in done:
            below = state[idx[b]]
            done[b] = below == goal[idx[b]] and (below == TABLE or ok(below))
        return done[b]

    return {b for b in letters if ok(b)}


def apply_move(state: Arrangement, block: str, target: str) -> tuple[Arrangement | None, str]:
    """(new arrangement, "") or (None, why the move is not possible)."""
    letters = string.ascii_uppercase[:len(state)]
    if block not in letters:
        return None, f"there is no block {block}"
    if target != TABLE and target not in letters:
        return None, f"there is no block {target}"
    clear = clear_blocks(state)
    i = letters.index(block)
    if block not in clear:
        return None, f"{block} is not clear"
    if target == block:
        return None, f"{block} cannot go onto itself"
    if target == state[i]:
        return None, f"{block} is already on {'the table' if target == TABLE else target}"
    if target != TABLE and target not in clear:
        return None, f"{target} is not clear"
    return state[:i] + (target,) + state[i + 1:], ""


def describe(state: Arrangement) -> str:
    letters = string.ascii_uppercase[:len(state)]
    return " ".join(f"{b} is on {'the table' if on == TABLE else on}." for b, on in zip(letters, state))


def describe_goal(goal: Arrangement) -> str:
    letters = string.ascii_uppercase[:len(goal)]
    return ", ".join(f"{b} on {'the table' if on == TABLE else on}" for b, on in zip(letters, goal)) + "."


def plan(start: Arrangement, goal: Arrangement) -> list[tuple[str, str]]:
    """The greedy planner: (block, target) moves from start to goal, at most 2n of them."""
    letters = string.ascii_uppercase[:len(start)]
    state, moves = start, []
    while state != goal:
        placed, clear = well_placed(state, goal), clear_blocks(state)
        move = None
        for b in clear:  # a block whose goal support is ready: put it there
            target = goal[letters.index(b)]
            if b not in placed and (target == TABLE or (target in placed and target in clear)):
                move = (b, target)
                break
        if move is None:  # otherwise free something: park a clear misplaced block on the table
            move = next((b, TABLE) for b in clear if b not in placed and state[letters.index(b)] != TABLE)
        state = apply_move(state, *move)[0]
        moves.append(move)
    return moves


@register("blocks")
class BlocksEnv:
    """Options: `num_blocks` (2..6, default 3), `max_steps` (default 2 x num_blocks, what the expert
    may need), `num_train_tasks`, `num_dev_tasks`, `num_test_tasks`, `seed` (fixes the split)."""

    system_prompt = _PROMPT

    def __init__(self, num_blocks: int = 3, max_steps: int | None = None, num_train_tasks: int = 80,
                 num_dev_tasks: int = 26, num_test_tasks: int = 50, seed: int = 0):
        if not 2 <= num_blocks <= 6:
            raise EnvError(f"blocks: env.num_blocks={num_blocks}: must be in 2..6")
        if max_steps is not None and max_steps < 1:
            raise EnvError(f"blocks: env.max_steps={max_steps}: must be >= 1")
        self.num_blocks = num_blocks
        self.max_steps = max_steps or 2 * num_blocks
        states = arrangements(num_blocks)
        pairs = [(s, g) for s in states for g in states if s != g]
        counts = split_counts("blocks", num_train_tasks, num_dev_tasks, num_test_tasks)
        self._splits = assign_splits("blocks", pairs, counts, seed)
        self._tasks = {k: v for split in self._splits.values() for k, v in split.items()}
        self._task: str | None = None

    def tasks(self, split: str) -> list[str]:
        return check_split("blocks", self._splits, split)

    def parse_action(self, reply: str) -> str | None:
        return parse_action(reply)

    def _observe(self) -> str:
        return f"Now: {describe(self.state)}\nGoal: {describe_goal(self.goal)}"

    def _info(self, valid: bool) -> dict:
        placed = len(well_placed(self.state, self.goal))
        progress = max(0.0, (placed - self.placed0) / (self.num_blocks - self.placed0))
        won = self.state == self.goal
        return {"valid": valid, "won": won, "score": progress, "progress": progress, "well_placed": placed,
                "state": " ".join(self.state)}  # the arrangement: an observation after a refused move differs

    def reset(self, task: str) -> tuple[str, dict]:
        if task not in self._tasks:
            raise EnvError(f"blocks has no task {task!r}")
        self._task = task
        self.state, self.goal = self._tasks[task]
        self.placed0 = len(well_placed(self.state, self.goal))
        self.steps = 0
        return self._observe(), self._info(True)

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self._task is None:
            raise RuntimeError("blocks: call reset(task) before step()")
        self.steps += 1
        move = parse_action(action)
        if move is None:
            new, why = None, f"{action.strip()[:40]!r} is not a valid action"
        else:
            _, block, _, target = move.split()
            new, why = apply_move(self.state, block.upper(), TABLE if target == TABLE else target.upper())
        if new is not None:
            self.state = new
        info = self._info(new is not None)
        if info["won"]:
            return "The blocks match the goal. You won.", 1.0, True, info
        msg = "" if new is not None else f"Nothing happens: {why}.\n"
        return msg + self._observe(), 0.0, self.steps >= self.max_steps, info

    def expert_actions(self, task: str) -> list[str]:
        start, goal = self._tasks[task]
        return [f"move {b.lower()} onto {t.lower()}" for b, t in plan(start, goal)]

    def close(self) -> None:
        pass
