"""TextWorld: text-adventure games generated locally with TextWorld's own generator.

Each task is one game made by `textworld.generator.make_game` + `compile_game` from a seed and
three knobs: `quest_length` (length of the winning walkthrough), `world_size` (number of rooms)
and `nb_objects`. Games are deterministic by seed, compiled once and cached on disk under
`<cache_dir>/<config-hash>/` (`cache_dir` defaults to `~/.cache/spa-rl/textworld`, the hash covers
the knobs and the textworld version), one file set per game seed, so a second construction (or a
change of `num_*_games`) generates only what is missing.

Splits never share a game: every split draws its game seeds from its own stream
(`game_seed(seed, split, k)`), and a candidate whose content hash (world, quest, names, objective)
equals a game already taken is skipped, in the fixed order train, dev, test.

Grounding: an action is valid when, case/whitespace-normalised, it is one of TextWorld's
admissible commands before the step. A valid action is played in the engine; an invalid one is
NOT sent to the engine (so `valid=False` always means "nothing happened") and is answered with
a message saying it is not a valid command, unless `invalid_to_engine=True`, which passes it
through and returns the engine's own answer. Either way it counts as a step.

Outcome: `info["score"]` is 1.0 once the quest is won, else 0.0; `reward` is 1.0 on the winning
step and 0.0 otherwise.

Progress (`info["progress"]`, the ground truth the credit-faithfulness metrics compare with;
`plan_progress=True`, the default): 1 - |policy| / |policy at reset|, where |policy| is the length
of TextWorld's shortest winning command list from the current state (its `policy_commands`), so
each quest step done adds 1/|walkthrough| and undoing one (taking back what was put) takes it
away; 1 once won, 0 once lost. Only the cheap infos are requested from the engine (admissible commands,
won/lost/score, objective, walkthrough); description/inventory would cost two extra engine
commands per step and the feedback already says what the agent needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from envs.base import SPLITS, EnvError, register

_FORMAT_VERSION = 1  # bump when the cached file layout changes
_BANNER_LINE = re.compile(r"^[\s_$|\\/<>]*$")  # TextWorld's ASCII-art title is drawn from these
_STATUS_LINE = re.compile(r"^>\s*(-=.*=-\s*-?\d+/\d+)?$")  # prompt + status bar (room score/moves)
_END_MARKER = re.compile(r"\*\*\*.*", re.DOTALL)  # "*** The End ***" + restart/quit prompt
_PREFIX = re.compile(r"^(action|command)\s*:\s*", re.IGNORECASE)
_EDGE_PUNCT = " \t.,;:!?'\"`*>-_()[]{}"


def parse_action(reply: str) -> str | None:
    """Model reply -> command: the first line that is non-empty after removing an optional
    'Action:' prefix and punctuation at its ends, lower-cased with single spaces; None if none."""
    for line in (reply or "").splitlines():
        text = _PREFIX.sub("", line.strip().strip(_EDGE_PUNCT.replace(":", "")))
        text = " ".join(text.strip(_EDGE_PUNCT).lower().split())
        if text:
            return text
    return None


def normalize_command(command: str) -> str:
    """Lower-case, single spaces, no surrounding whitespace: the form used to compare commands."""
    return " ".join((command or "").lower().split())


def clean_observation(text: str) -> str:
    """Drop the ASCII-art banner, the '>' prompt and status bar, the end-of-game restart prompt
    and blank lines; strip every line."""
    text = _END_MARKER.sub("", text or "")
    lines = [line.strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line and not _BANNER_LINE.match(line)
                     and not _STATUS_LINE.match(line))


def game_seed(seed: int, split: str, k: int) -> int:
    """The k-th game seed of `split`: a hash of (seed, split, k) in [0, 2**31)."""
    digest = hashlib.sha256(f"{seed}/{split}/{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def config_hash(quest_length: int, world_size: int, nb_objects: int, tw_version: str) -> str:
    """12 hex digits naming the cache folder of games built with these knobs."""
    key = json.dumps([_FORMAT_VERSION, quest_length, world_size, nb_objects, tw_version])
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def content_hash(serialized_game: dict) -> str:
    """Hash of what makes two games the same game (world, quests, names, objective), not of the
    seeds or uuid, so equal games from different seeds are caught."""
    keys = ("world", "quests", "infos", "objective")
    blob = json.dumps({k: serialized_game.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def _import_textworld():
    try:
        import textworld  # noqa: PLC0415  (heavy, optional: imported only when the env is used)
        import textworld.generator  # noqa: PLC0415
    except ImportError as e:
        raise EnvError(f"env 'textworld' needs the textworld package: pip install textworld ({e})")
    return textworld


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _generate_game(tw, folder: Path, seed: int, quest_length: int, world_size: int,
                   nb_objects: int) -> dict:
    """Make and compile one game into `folder/<seed>.z8|.json`; return its meta record (also
    written to `<seed>.meta.json`, last, so its presence means the game is complete)."""
    opts = tw.GameOptions()
    opts.seeds = seed
    opts.nb_rooms = world_size
    opts.nb_objects = nb_objects
    opts.quest_length = quest_length
    opts.force_recompile = True
    try:
        game = tw.generator.make_game(opts)
    except Exception as e:  # the generator can fail to fit a quest in a world: skip that seed
        meta = {"seed": seed, "rejected": f"{type(e).__name__}: {e}"}
        _write_json_atomic(folder / f"{seed}.meta.json", meta)
        return meta
    return _save_game(tw, folder, seed, game, opts)


def _save_game(tw, folder: Path, seed: int, game, opts) -> dict:
    """Compile a made game into `folder/<seed>.z8|.json` and write its meta record (last)."""
    build = Path(tempfile.mkdtemp(prefix=f"build-{seed}-", dir=folder))
    try:
        opts.path = str(build) + os.sep
        z8 = Path(tw.generator.compile_game(game, opts))
        os.replace(z8, folder / f"{seed}.z8")
        os.replace(z8.with_suffix(".json"), folder / f"{seed}.json")
    finally:
        shutil.rmtree(build, ignore_errors=True)
    meta = {"seed": seed, "hash": content_hash(game.serialize()), "uuid": game.metadata["uuid"],
            "walkthrough": list(game.walkthrough), "objective": game.objective}
    _write_json_atomic(folder / f"{seed}.meta.json", meta)
    return meta


@register("textworld")
class TextWorldEnv:
    """TextWorld games as a text env (see the module docstring for the rules).

    Options:
        num_train_games: games in the "train" split (task ids "train-0000", ...).
        num_dev_games: games in the "dev" split.
        num_test_games: games in the "test" split.
        quest_length: number of actions in each game's winning walkthrough (>= 1).
        world_size: number of rooms (>= 1).
        nb_objects: number of objects besides the rooms (>= 0).
        seed: fixes every game of every split.
        cache_dir: root of the game cache (default `$XDG_CACHE_HOME/spa-rl/textworld`, i.e.
            `~/.cache/spa-rl/textworld`); games live in `<cache_dir>/<config-hash>/`.
        max_steps: the episode ends (truncated, score 0) after this many actions.
        plan_progress: report `info["progress"]` from the remaining winning plan (module docstring).
        show_admissible: append the admissible commands to every observation.
        invalid_to_engine: send non-admissible commands to the engine instead of answering them
            with a "not a valid command" message.
        progress: show a tqdm bar while generating games (only shown when games are missing).
    """

    def __init__(self, num_train_games: int = 20, num_dev_games: int = 5,
                 num_test_games: int = 10, quest_length: int = 3, world_size: int = 4,
                 nb_objects: int = 6, seed: int = 0, cache_dir: str | None = None,
                 max_steps: int = 30, show_admissible: bool = True,
                 invalid_to_engine: bool = False, progress: bool = True, plan_progress: bool = True):
        counts = {"train": num_train_games, "dev": num_dev_games, "test": num_test_games}
        for name, value, low in [("num_train_games", num_train_games, 1),
                                 ("num_dev_games", num_dev_games, 0),
                                 ("num_test_games", num_test_games, 0),
                                 ("quest_length", quest_length, 1), ("world_size", world_size, 1),
                                 ("nb_objects", nb_objects, 0), ("max_steps", max_steps, 1)]:
            if not isinstance(value, int) or value < low:
                raise EnvError(f"env.{name}={value!r}: must be an integer >= {low}")
        self._tw = _import_textworld()
        self.max_steps = max_steps
        self.plan_progress = plan_progress
        self._plan: list[str] | None = None  # the engine's shortest winning commands from now
        self._plan0 = 1  # their number at reset
        self._lost = False
        self.show_admissible = show_admissible
        self.invalid_to_engine = invalid_to_engine
        root = Path(cache_dir) if cache_dir else (
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spa-rl" / "textworld")
        self.cache_dir = root / config_hash(quest_length, world_size, nb_objects,
                                            self._tw.__version__)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.num_generated = 0  # games this construction had to generate (0 = all from cache)
        knobs = (quest_length, world_size, nb_objects)
        self._games = self._select_games(counts, seed, knobs, progress)
        self.system_prompt = (
            "You are playing a text adventure game. The first message tells you your goal; each "
            "later message tells you what happened after your last command"
            + (" and lists the commands available now" if show_admissible else "")
            + ". Reply with exactly one command on a single line, for example `go east` or "
            "`take key from table` (you may write it as `Action: go east`), and nothing else."
        )
        self._env = None  # the running textworld environment
        self._env_path: Path | None = None
        self._admissible: dict[str, str] = {}  # normalised -> engine spelling
        self._steps = 0
        self._done = True
        self._won = False

    # --- game set ---------------------------------------------------------------------------

    def _select_games(self, counts: dict[str, int], seed: int, knobs: tuple[int, int, int],
                      progress: bool) -> dict[str, list[dict]]:
        """Take `counts[split]` games per split from each split's seed stream, skipping seeds the
        generator rejects and games equal to one already taken."""
        from tqdm.auto import tqdm  # noqa: PLC0415

        missing = sum(not (self.cache_dir / f"{game_seed(seed, s, k)}.meta.json").exists()
                      for s in SPLITS for k in range(counts[s]))
        bar = tqdm(total=sum(counts.values()), desc="textworld games", unit="game",
                   disable=not progress or missing == 0)
        taken_hashes: set[str] = set()
        games: dict[str, list[dict]] = {}
        for split in SPLITS:
            games[split] = []
            k = 0
            while len(games[split]) < counts[split]:
                if k >= 10 * counts[split] + 20:
                    raise EnvError(
                        f"env textworld: only {len(games[split])} distinct {split} games in {k} "
                        f"seeds with quest_length, world_size, nb_objects = {knobs}; "
                        f"use a larger world or fewer games")
                meta = self._load_or_generate(game_seed(seed, split, k), knobs)
                k += 1
                if "rejected" in meta or meta["hash"] in taken_hashes:
                    continue
                taken_hashes.add(meta["hash"])
                games[split].append(meta)
                bar.update(1)
        bar.close()
        return games

    def _cached_meta(self, seed: int) -> dict | None:
        """The cached game's metadata (or its rejection), None when seed must be generated."""
        meta_path = self.cache_dir / f"{seed}.meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if "rejected" in meta or (self.cache_dir / f"{seed}.z8").exists():
                return meta
        return None

    def _load_or_generate(self, seed: int, knobs: tuple[int, int, int]) -> dict:
        meta = self._cached_meta(seed)
        if meta is not None:
            return meta
        self.num_generated += 1
        return _generate_game(self._tw, self.cache_dir, seed, *knobs)

    def tasks(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise EnvError(f"split={split!r}: must be one of {list(SPLITS)}")
        return [f"{split}-{i:04d}" for i in range(len(self._games[split]))]

    def _game(self, task: str) -> dict:
        split, _, index = task.partition("-")
        games = self._games.get(split)
        if games is None or not index.isdigit() or int(index) >= len(games):
            sizes = {s: len(g) for s, g in self._games.items()}
            raise EnvError(f"unknown textworld task {task!r}; ids are '<split>-<index>' with "
                           f"index below the split size {sizes}, e.g. 'train-0000'")
        return games[int(index)]

    def game_id(self, task: str) -> str:
        """Content hash of the game behind `task` (equal ids = the same game)."""
        return self._game(task)["hash"]

    def game_info(self, task: str) -> dict[str, Any]:
        """The cached record of `task`'s game: seed, hash, uuid, walkthrough, objective."""
        return dict(self._game(task))

    def expert_actions(self, task: str) -> list[str]:
        """The game's walkthrough: a shortest winning command sequence."""
        return list(self._game(task)["walkthrough"])

    def parse_action(self, reply: str) -> str | None:
        return parse_action(reply)

    # --- playing ----------------------------------------------------------------------------

    def _observation(self, feedback: str) -> str:
        text = clean_observation(feedback)
        if self.show_admissible and not self._done and self._admissible:
            text += "\nAvailable commands: " + ", ".join(self._admissible.values())
        return text

    def _absorb(self, state) -> None:
        commands = state["admissible_commands"] or []
        self._admissible = {normalize_command(c): c for c in commands}
        self._won = bool(state["won"])
        self._lost = bool(state["lost"])
        self._plan = state.get("policy_commands")
        # the world's facts (where everything is, what is open, what is held) as a key: GiGPO's anchor
        # state. The observation is not one: it opens with the last command's feedback
        facts = "|".join(sorted(str(f) for f in state.get("facts") or ()))
        self._state_key = hashlib.sha1(facts.encode()).hexdigest()[:16]
        if self._steps == 0:  # at reset (step() counts before absorbing)
            self._plan0 = max(1, len(self._plan or []))

    def _plan_fraction(self) -> float:
        """1 - |policy| / |policy at reset|: the share of the winning plan done; 1 won, 0 lost."""
        if self._won:
            return 1.0
        if self._lost or self._plan is None:
            return 0.0
        return min(1.0, max(0.0, 1.0 - len(self._plan) / self._plan0))

    def _info(self, valid: bool, lost: bool = False, truncated: bool = False) -> dict[str, Any]:
        info = {"valid": valid, "won": self._won, "lost": lost, "truncated": truncated,
                "score": 1.0 if self._won else 0.0, "steps": self._steps,
                "admissible": [] if self._done else list(self._admissible.values()), "state": self._state_key}
        if self.plan_progress:
            info["progress"] = self._plan_fraction()
        return info

    def _env_infos(self):
        """What the engine reports each step (a subclass may ask for more)."""
        return self._tw.EnvInfos(admissible_commands=True, won=True, lost=True, score=True,
                                 max_score=True, objective=True, facts=True, extras=["walkthrough"],
                                 policy_commands=self.plan_progress)

    def reset(self, task: str) -> tuple[str, dict[str, Any]]:
        path = self.cache_dir / f"{self._game(task)['seed']}.z8"
        if self._env is None or self._env_path != path:
            self.close()
            infos = self._env_infos()
            with warnings.catch_warnings():  # jericho: "not fully supported"; TextWorld scores
                warnings.filterwarnings("ignore", message=".*not fully supported.*")
                self._env = self._tw.start(str(path), request_infos=infos)
            self._env_path = path
        state = self._env.reset()
        self._steps, self._done = 0, False
        self._absorb(state)
        info = self._info(valid=True)
        info.update(task=task, objective=state["objective"])
        return self._observation(state.feedback), info

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._env is None:
            raise EnvError("textworld env: call reset(task) before step(action)")
        if self._done:
            return "The game is over.", 0.0, True, self._info(valid=False)
        command = normalize_command(action)
        valid = command in self._admissible
        self._steps += 1
        lost = False
        if valid or self.invalid_to_engine:
            state, _, _ = self._env.step(self._admissible.get(command, command))
            self._absorb(state)
            lost = bool(state["lost"])
            feedback = state.feedback
        else:
            feedback = f"'{command}' is not a valid command here; choose one of the commands listed."
        truncated = not (self._won or lost) and self._steps >= self.max_steps
        self._done = self._won or lost or truncated
        obs = self._observation(feedback)
        if self._won:
            obs += "\nYou won!"
        elif lost:
            obs += "\nYou lost."
        elif truncated:
            obs += "\nOut of steps."
        info = self._info(valid, lost=lost, truncated=truncated)
        return obs, (1.0 if self._won else 0.0), self._done, info

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._env_path = None, None
