"""Maze: LMRL-Gym's maze task (Abdulhai et al. 2023), fully or partially observed, pure Python.

The agent walks a grid maze with `move up`, `move down`, `move left`, `move right` (LMRL-Gym's
wording; `go north/south/west/east` are accepted as synonyms) until it stands on the goal.

- `observed: full` (LMRL-Gym's fully observed maze): every observation gives the agent's and
  the goal's (row, column) and the walls next to the agent: "You are at 1,1. The goal is at 8,6.
  Walls: up, down, left."
- `observed: partial` (LMRL-Gym's partially observed maze): only the walls next to the agent:
  "Walls: up, down, left." The agent must tell where it is from the walls it has met.

`wording: compass` says `go north` / `go south` / `go west` / `go east` and names walls by compass
point instead ("Walls: north, south, west."): the built-in tiny model's tokenizer knows those
words, so its episodes are several times fewer tokens. Both wordings are accepted as actions.

The mazes are LMRL-Gym's (from mazelab): `double_t` (the one LMRL-Gym trains and evaluates on,
goal at 8,6), `umaze` (goal 3,3), `medium`, `large` (LMRL-Gym ships them without a goal; ours is
the free cell farthest by path from the top-left free cell). Walking into a wall is an invalid
step (LMRL-Gym leaves the agent in place with a -4 reward; here the grounding signal says it).

Where this departs from LMRL-Gym: its per-step reward (-1 a move, 0 at the goal) is replaced by
this project's delayed outcome; `goal: any` (the default) lets every free cell be the goal as well
as the start, so there are enough distinct tasks for disjoint train/dev/test splits
(`goal: fixed` is LMRL-Gym's setting: one goal, every other free cell a start); and the agent's
position is written "1,1" rather than "1, 1" with spaced digits.

A task is (maze, start, goal); task ids "<split>-<i>" name distinct tasks drawn by one seeded
shuffle, so the splits never share a task.

Ground truth for credit: with d_t the shortest-path (BFS) distance to the goal after step t and
d_0 the distance at the start, `info["progress"]` = max(0, 1 - d_t / d_0): each step towards the
goal adds 1/d_0, a step away takes it back, and steps beyond the start distance count nothing.
The episode's `score` is the progress reached (1 when won), so the outcome is exactly the sum of
the per-step increments. The expert walks a BFS shortest path (ties: up, down, left, right).
"""

from __future__ import annotations

import re
from collections import deque

from envs.base import EnvError, first_command_line, register
from envs.splits import assign_splits, check_split, split_counts

MAZES = {  # '#' wall, '.' free; row 0 is the top
    "double_t": ("#############", "#.....#.....#", "###.#####.###", "###.#####.###", "###.#####.###",
                 "###.......###", "######.######", "######.######", "######.######", "#############"),
    "umaze": ("#####", "#...#", "#.#.#", "#.#.#", "#####"),
    "medium": ("########", "#..#...#", "#..#.#.#", "##....##", "###.#..#", "#....#.#", "#..#...#",
               "########"),
    "large": ("#########", "#.....#.#", "#.#.#.#.#", "#...#...#", "#.###.###", "#.......#", "###.###.#",
              "#...#...#", "#.#.#####", "#.#.#...#", "#.....#.#", "#########"),
}
_LMRL_GOALS = {"double_t": (8, 6), "umaze": (3, 3)}
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
_SYNONYMS = {"north": "up", "south": "down", "west": "left", "east": "right"}
_ACTION_RE = re.compile(r"^(?:move|go) (up|down|left|right|north|south|east|west)$")
ACTIONS = tuple(f"move {d}" for d in MOVES)
_COMPASS = {v: k for k, v in _SYNONYMS.items()}
_PROMPT = "You are in a maze. Reach the goal. {what}Reply with one action per turn: {actions}."


def parse_action(reply: str) -> str | None:
    """'move <dir>' (or 'go <compass dir>') from the first line of a reply, as 'move <dir>'."""
    m = _ACTION_RE.match(first_command_line(reply) or "")
    return f"move {_SYNONYMS.get(m.group(1), m.group(1))}" if m else None


def free_cells(maze: str) -> list[tuple[int, int]]:
    return [(r, c) for r, row in enumerate(MAZES[maze]) for c, ch in enumerate(row) if ch == "."]


def distances(maze: str, goal: tuple[int, int]) -> dict[tuple[int, int], int]:
    """BFS distance from every free cell to `goal`."""
    grid = MAZES[maze]
    dist = {goal: 0}
    queue = deque([goal])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES.values():
            nxt = (r + dr, c + dc)
            if grid[nxt[0]][nxt[1]] == "." and nxt not in dist:
                dist[nxt] = dist[(r, c)] + 1
                queue.append(nxt)
    return dist


def default_goal(maze: str) -> tuple[int, int]:
    if maze in _LMRL_GOALS:
        return _LMRL_GOALS[maze]
    dist = distances(maze, free_cells(maze)[0])
    return max(dist, key=lambda cell: (dist[cell], cell))


def shortest_path(maze: str, start: tuple[int, int], goal: tuple[int, int]) -> list[str]:
    """The expert: a BFS shortest path from start to goal as actions."""
    dist = distances(maze, goal)
    pos, actions = start, []
    while pos != goal:
        for name, (dr, dc) in MOVES.items():
            nxt = (pos[0] + dr, pos[1] + dc)
            if dist.get(nxt, -1) == dist[pos] - 1:
                actions.append(f"move {name}")
                pos = nxt
                break
    return actions


@register("maze")
class MazeEnv:
    """Options: `maze` (double_t | umaze | medium | large | all; default double_t, LMRL-Gym's),
    `observed` (full | partial), `wording` (lmrl: move up/down/left/right | compass: go
    north/south/west/east), `goal` (any: every (start, goal) pair of free cells is a task |
    fixed: LMRL-Gym's single goal per maze), `max_steps` (default: the maze's number of free
    cells), `num_train_tasks`, `num_dev_tasks`, `num_test_tasks`, `seed` (fixes the split)."""

    def __init__(self, maze: str = "double_t", observed: str = "full", wording: str = "lmrl", goal: str = "any",
                 max_steps: int | None = None,
                 num_train_tasks: int = 200, num_dev_tasks: int = 50, num_test_tasks: int = 100, seed: int = 0):
        if maze != "all" and maze not in MAZES:
            raise EnvError(f"maze: env.maze={maze!r}: choose one of {sorted(MAZES)} or 'all'")
        if observed not in ("full", "partial"):
            raise EnvError(f"maze: env.observed={observed!r}: choose 'full' or 'partial'")
        if wording not in ("lmrl", "compass"):
            raise EnvError(f"maze: env.wording={wording!r}: choose 'lmrl' or 'compass'")
        if goal not in ("any", "fixed"):
            raise EnvError(f"maze: env.goal={goal!r}: choose 'any' or 'fixed'")
        if max_steps is not None and max_steps < 1:
            raise EnvError(f"maze: env.max_steps={max_steps}: must be >= 1")
        self.observed, self.max_steps = observed, max_steps
        # display name of each move and the action that makes it, in the chosen wording
        self._names = {d: _COMPASS[d] if wording == "compass" else d for d in MOVES}
        self._actions = {d: f"go {n}" if wording == "compass" else f"move {n}" for d, n in self._names.items()}
        tasks = []
        for name in (sorted(MAZES) if maze == "all" else [maze]):
            goals = [default_goal(name)] if goal == "fixed" else free_cells(name)
            tasks += [(name, s, g) for g in goals for s in free_cells(name) if s != g]
        counts = split_counts("maze", num_train_tasks, num_dev_tasks, num_test_tasks)
        self._splits = assign_splits("maze", tasks, counts, seed)
        self._tasks = {k: v for split in self._splits.values() for k, v in split.items()}
        what = ("Each turn you see your position and the goal's as row,column, and the walls next to you. "
                if observed == "full" else "Each turn you see only the walls next to you. ")
        self.system_prompt = _PROMPT.format(what=what, actions=", ".join(self._actions.values()))
        self._task: str | None = None

    def tasks(self, split: str) -> list[str]:
        return check_split("maze", self._splits, split)

    def parse_action(self, reply: str) -> str | None:
        move = parse_action(reply)
        return self._actions[move[5:]] if move else None

    def _observe(self) -> str:
        grid, (r, c) = MAZES[self.maze], self.pos
        walls = [self._names[d] for d, (dr, dc) in MOVES.items() if grid[r + dr][c + dc] == "#"]
        text = f"Walls: {', '.join(walls) if walls else 'none'}."
        if self.observed == "full":
            text = f"You are at {r},{c}. The goal is at {self.goal[0]},{self.goal[1]}. " + text
        return text

    def _info(self, valid: bool) -> dict:
        progress = max(0.0, 1.0 - self._dist[self.pos] / self.start_distance)
        won = self.pos == self.goal
        return {"valid": valid, "won": won, "score": progress, "progress": progress, "distance": self._dist[self.pos]}

    def reset(self, task: str) -> tuple[str, dict]:
        if task not in self._tasks:
            raise EnvError(f"maze has no task {task!r}")
        self._task = task
        self.maze, self.pos, self.goal = self._tasks[task]
        self._dist = distances(self.maze, self.goal)
        self.start_distance = self._dist[self.pos]
        self.steps = 0
        self._limit = self.max_steps or len(self._dist)
        return self._observe(), self._info(True)

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self._task is None:
            raise RuntimeError("maze: call reset(task) before step()")
        self.steps += 1
        move = parse_action(action)
        valid = False
        if move is None:
            msg = f"Nothing happens: {action.strip()[:40]!r} is not a valid action. "
        else:
            direction = move.split()[1]
            dr, dc = MOVES[direction]
            nxt = (self.pos[0] + dr, self.pos[1] + dc)
            if MAZES[self.maze][nxt[0]][nxt[1]] == "#":
                where = f"to the {self._names[direction]}" if self._names[direction] != direction else direction
                msg = f"Nothing happens: there is a wall {where}. "
            else:
                self.pos, valid, msg = nxt, True, ""
        info = self._info(valid)
        if info["won"]:
            return "You reached the goal. You won.", 1.0, True, info
        return msg + self._observe(), 0.0, self.steps >= self._limit, info

    def expert_actions(self, task: str) -> list[str]:
        maze, start, goal = self._tasks[task]
        return [self._actions[a[5:]] for a in shortest_path(maze, start, goal)]

    def close(self) -> None:
        pass
