"""ALFWorld (Shridhar et al., 2021), text-only: household tasks as TextWorld PDDL games.

The games are not shipped with the `alfworld` package; `alfworld-download` fetches them into
$ALFWORLD_DATA (default ~/.cache/alfworld). This env reads that layout directly:

    <data_dir>/json_2.1.1/{train,valid_seen,valid_unseen}/<task_type>-<obj>-<mrecep>-<recep>-<scene>/
        <trial>/traj_data.json + game.tw-pddl

Splits: "train" = train, "dev" = valid_seen (in distribution), "test" = valid_unseen (unseen
rooms), as in the ALFWorld paper. Task ids are paths relative to json_2.1.1, e.g.
"valid_unseen/pick_and_place_simple-Apple-None-CounterTop-10/trial_T2019...". Like ALFWorld's
own AlfredTWEnv, games whose path says "movable" or "Sliced", and games not marked solvable,
are left out.

Each game runs as `textworld.start(game.tw-pddl)` (TextWorld's PddlEnv, which needs the
`fast_downward` extension that `textworld[pddl]` builds) with ALFWorld's wrappers: the demangler
(object ids -> "apple 1"), and for `expert_actions` the hand-coded expert. `info["valid"]` is
membership of the (normalised) action in the admissible commands of the state it was taken in;
`info["won"]` is the PDDL goal check; `info["score"]` is 1.0 when won, else 0.0.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from envs.base import EnvError, first_command_line, register

SPLIT_DIRS = {"train": "train", "dev": "valid_seen", "test": "valid_unseen"}
TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
VERBS = ("go to", "take", "move", "put", "open", "close", "toggle", "heat", "cool", "clean",
         "slice", "use", "examine", "look", "inventory", "help")
_VERB_RE = re.compile(r"^(" + "|".join(re.escape(v) for v in VERBS) + r")\b")
_DOWNLOAD_HINT = (
    "ALFWorld's games are a separate download: `pip install alfworld && alfworld-download` "
    "(writes json_2.1.1/ and logic/ into $ALFWORLD_DATA, default ~/.cache/alfworld); then set "
    "env.data_dir=<that directory> in the recipe or export ALFWORLD_DATA"
)


def parse_action(reply: str) -> str | None:
    """First non-empty line, minus an 'Action:'/'>' prefix and surrounding quotes/punctuation,
    lower-cased with single spaces; ReAct-style 'put X in/on Y' becomes ALFWorld's 'move X to Y'.
    None unless it starts with a known verb."""
    text = first_command_line(reply)
    if text:
        text = re.sub(r"^put (.+?) (?:in|on|in/on|into|onto) (.+)$", r"move \1 to \2", text)
        return text if _VERB_RE.match(text) else None
    return None


def discover_games(data_dir: str | Path, split: str, task_types: tuple[str, ...] = TASK_TYPES) -> list[str]:
    """Task ids (paths relative to <data_dir>/json_2.1.1, sorted) of the playable games of a split."""
    base = Path(data_dir) / "json_2.1.1"
    ids = []
    for traj_file in sorted((base / SPLIT_DIRS[split]).rglob("traj_data.json")):
        trial = traj_file.parent
        rel = trial.relative_to(base).as_posix()
        game_file = trial / "game.tw-pddl"
        if "movable" in rel or "Sliced" in rel or not game_file.is_file():
            continue
        if json.loads(traj_file.read_text()).get("task_type") not in task_types:
            continue
        if not json.loads(game_file.read_text()).get("solvable", False):
            continue
        ids.append(rel)
    return ids


def _check_engine() -> None:
    try:
        import alfworld.agents.environment.alfred_tw_env  # noqa: F401  (the wrappers we use)
        import fast_downward  # noqa: F401  (TextWorld's PDDL backend)
    except ImportError as e:
        raise EnvError(
            f"env.name=alfworld needs the alfworld package and TextWorld's PDDL backend ({e}): "
            "`pip install alfworld` (pulls textworld[pddl], whose fast-downward-textworld is "
            "compiled from source: needs cmake and a C++ compiler)"
        ) from None


@register("alfworld")
class ALFWorldEnv:
    """Options:
    - `data_dir`: the ALFWorld data directory holding json_2.1.1/ (default $ALFWORLD_DATA).
    - `task_types`: ALFRED task types to keep (default all six).
    - `max_tasks_per_split`: keep only the first N games of each split (0 = all).
    - `max_steps`: episode length limit (`info["truncated"]` is set when hit).
    - `expert_max_steps`: step budget of the hand-coded expert in `expert_actions`.
    """

    system_prompt = (
        "You are a household robot in a room (ALFWorld). Complete the task stated in the first "
        "observation. Reply with exactly one command per turn, using object names exactly as "
        "written (with their numbers): go to <receptacle>, open <receptacle>, close <receptacle>, "
        "take <object> from <receptacle>, move <object> to <receptacle>, heat <object> with "
        "<microwave>, cool <object> with <fridge>, clean <object> with <sinkbasin>, use <lamp>, "
        "examine <thing>, look, inventory."
    )

    def __init__(self, data_dir: str | None = None, task_types: list[str] | tuple[str, ...] = TASK_TYPES,
                 max_tasks_per_split: int = 0, max_steps: int = 50, expert_max_steps: int = 150):
        data_dir = data_dir or os.environ.get("ALFWORLD_DATA", "")
        if not data_dir:
            raise EnvError(f"env.data_dir is not set and $ALFWORLD_DATA is empty. {_DOWNLOAD_HINT}")
        if not (Path(data_dir).expanduser() / "json_2.1.1").is_dir():
            raise EnvError(f"env.data_dir={data_dir!r} has no json_2.1.1/ folder of ALFWorld games. {_DOWNLOAD_HINT}")
        unknown = [t for t in task_types if t not in TASK_TYPES]
        if unknown:
            raise EnvError(f"env.task_types: unknown {unknown}; choose from {list(TASK_TYPES)}")
        _check_engine()
        self.data_dir = Path(data_dir).expanduser()
        self.task_types = tuple(task_types)
        self.max_tasks_per_split = max_tasks_per_split
        self.max_steps = max_steps
        self.expert_max_steps = expert_max_steps
        self._splits: dict[str, list[str]] = {}
        self._expert: dict[str, list[str]] = {}
        self._game = None  # the running textworld env
        self._task: str | None = None

    def tasks(self, split: str) -> list[str]:
        if split not in SPLIT_DIRS:
            raise EnvError(f"alfworld split {split!r}: choose one of {sorted(SPLIT_DIRS)}")
        if split not in self._splits:
            ids = discover_games(self.data_dir, split, self.task_types)
            self._splits[split] = ids[: self.max_tasks_per_split] if self.max_tasks_per_split else ids
        return list(self._splits[split])

    def parse_action(self, reply: str) -> str | None:
        return parse_action(reply)

    def _game_file(self, task: str) -> str:
        split = next((s for s, d in SPLIT_DIRS.items() if task.startswith(d + "/")), None)
        if split is None or task not in self.tasks(split):
            raise EnvError(f"alfworld task {task!r} is not a playable game under {self.data_dir / 'json_2.1.1'}")
        return str(self.data_dir / "json_2.1.1" / task / "game.tw-pddl")

    def _start(self, task: str, with_expert: bool):
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos

        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
        wrappers = [AlfredDemangler(shuffle=False), AlfredInfos]
        if with_expert:
            wrappers.append(AlfredExpert("handcoded"))
            infos.extras.append("expert_plan")
        return textworld.start(self._game_file(task), infos, wrappers=wrappers)

    def reset(self, task: str) -> tuple[str, dict[str, Any]]:
        self.close()
        self._game = self._start(task, with_expert=False)
        self.state = self._game.reset()
        self._task, self.steps = task, 0
        return self.state["feedback"].strip(), self._info(True)

    def _admissible(self) -> list[str]:
        return [" ".join(c.lower().split()) for c in self.state["admissible_commands"] or []]

    def _info(self, valid: bool, truncated: bool = False) -> dict[str, Any]:
        won = bool(self.state["won"])
        return {"valid": valid, "won": won, "score": 1.0 if won else 0.0, "truncated": truncated,
                "admissible": self._admissible()}

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._game is None:
            raise RuntimeError("alfworld: call reset(task) before step()")
        self.steps += 1
        command = parse_action(action)
        valid = command is not None and command in self._admissible()
        if valid:
            self.state, _, _ = self._game.step(command)
            obs = self.state["feedback"].strip()
        else:
            obs = "Nothing happens."  # what ALFWorld itself answers to a command it cannot run
        truncated = not self.state["won"] and self.steps >= self.max_steps
        info = self._info(valid, truncated)
        return obs, info["score"] if info["won"] else 0.0, info["won"] or truncated, info

    def expert_actions(self, task: str) -> list[str]:
        """Actions of ALFWorld's hand-coded expert, played to the win on a separate copy of the
        game (so a running episode is not disturbed)."""
        if task not in self._expert:
            game = self._start(task, with_expert=True)
            try:
                state, actions = game.reset(), []
                while not state["won"] and len(actions) < self.expert_max_steps:
                    actions.append(state["extra.expert_plan"][0])
                    state, _, _ = game.step(actions[-1])
            finally:
                game.close()
            if not state["won"]:
                raise EnvError(f"alfworld: the hand-coded expert did not solve {task!r} in {self.expert_max_steps} steps")
            self._expert[task] = actions
        return list(self._expert[task])

    def close(self) -> None:
        if self._game is not None:
            self._game.close()
            self._game = None
