"""TextWorld's challenge games (`textworld.challenges`): tw-coin_collector, tw-treasure_hunter,
tw-simple and tw-cooking, generated locally and played like `envs.textworld_env`.

This env is `TextWorldEnv` with another game maker: the games come from the challenge's own
`make(settings, options)` instead of `make_game` with quest knobs, and are compiled, cached and
deduplicated by the same code (`<cache_dir>/<settings-hash>/<seed>.z8`, one seed stream per split,
a game whose content equals one already taken is skipped), so task ids are disjoint across
splits. Observations, grounding (admissible commands), `max_steps` and the expert (the game's
walkthrough) are TextWorldEnv's; `info["score"]` is 1.0 once won, else 0.0, as there.

Where a challenge has its own train/test distributions they are used (`challenge_splits`):
tw-cooking's train/valid/test food sets for our train/dev/test, tw-simple's test distribution for
test. Set it False to draw every split from the training distribution.

Progress (`info["progress"]`, ground truth for credit assignment), chosen by `progress_signal`:
- `score`: the game's points over its maximum (TextWorld's intermediate rewards: tw-simple with
  dense/balanced rewards, one point per recipe step in tw-cooking);
- `plan`: 1 - |policy| / |policy at reset|, where |policy| is the length of TextWorld's shortest
  winning command list from the current state (its `policy_commands`): steps of the quest done,
  and for coin collector and treasure hunter (one point in all) the rooms walked towards the goal;
  0 once lost;
- `auto` (default): `score` for games with more than one point, else `plan`.
Both are 1 when won. `info` also carries `points` and `max_points`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from envs.base import SPLITS, EnvError, register
from envs.textworld_env import TextWorldEnv, _import_textworld, _save_game, _write_json_atomic, game_seed

_FORMAT_VERSION = 1  # bump when the cached file layout changes
CHALLENGES = ("coin_collector", "treasure_hunter", "simple", "cooking")
_COOKING_SPLITS = {"train": "train", "dev": "valid", "test": "test"}
_GOALS = {"coin_collector": "find the coin and take it",
          "treasure_hunter": "find the object named in the first message and take it",
          "simple": "do what the first message asks",
          "cooking": "cook and eat the meal the cookbook describes"}


def challenge_settings(challenge: str, level: int, rewards: str, goal: str, recipe: int, take: int,
                       go: int, open: bool, cook: bool, cut: bool, drop: bool,
                       recipe_seed: int) -> dict[str, Any]:
    """The settings dict the challenge's `make` reads, checked here so bad options fail in one
    line before any game is generated."""
    if challenge not in CHALLENGES:
        raise EnvError(f"env.challenge={challenge!r}: choose one of {list(CHALLENGES)}")
    if challenge in ("coin_collector", "treasure_hunter"):
        ok = isinstance(level, int) and 1 <= level <= (300 if challenge == "coin_collector" else 30)
        if ok and challenge == "coin_collector":  # rooms = (distractors + 1) * path length <= 100
            ok = ((level - 1) // 100 + 1) * ((level - 1) % 100 + 1) <= 100
        if not ok:
            allowed = "1..100, 101..150, 201..233" if challenge == "coin_collector" else "1..30"
            raise EnvError(f"env.level={level!r}: {challenge} levels are {allowed}")
        return {"level": level}
    if challenge == "simple":
        if rewards not in ("dense", "balanced", "sparse"):
            raise EnvError(f"env.rewards={rewards!r}: choose dense, balanced or sparse")
        if goal not in ("detailed", "brief", "none"):
            raise EnvError(f"env.goal={goal!r}: choose detailed, brief or none")
        return {"rewards": rewards, "goal": goal, "test": False}
    if go not in (1, 6, 9, 12):
        raise EnvError(f"env.go={go!r}: cooking worlds have 1, 6, 9 or 12 rooms")
    if not isinstance(recipe, int) or not 1 <= recipe <= 5 or not isinstance(take, int) or not 0 <= take <= recipe:
        raise EnvError(f"env.recipe={recipe!r}, env.take={take!r}: need 1 <= recipe <= 5 and 0 <= take <= recipe")
    if recipe_seed and not take:
        raise EnvError("env.recipe_seed > 0 needs env.take >= 1 (TextWorld's rule)")
    return {"recipe": recipe, "take": take, "go": go, "open": bool(open), "cook": bool(cook),
            "cut": bool(cut), "drop": bool(drop), "recipe_seed": recipe_seed, "split": "train"}


@register("twchallenge")
class TwChallengeEnv(TextWorldEnv):
    """TextWorld challenge games (rules in the module docstring).

    Options:
        challenge: "coin_collector", "treasure_hunter", "simple" or "cooking".
        level: coin_collector 1..100 (path of `level` rooms; 101..150 and 201..233 add dead-end
            rooms: TextWorld 1.7 caps worlds at 100 rooms) or treasure_hunter 1..30.
        rewards: simple: "dense", "balanced" or "sparse" intermediate rewards.
        goal: simple: "detailed", "brief" or "none" description of the objective.
        recipe, take, go, open, cook, cut, drop, recipe_seed: cooking skills, as tw-make's
            tw-cooking flags (ingredients in the recipe, of which `take` must be found; 1/6/9/12
            rooms; containers to open; cook/cut/drop needed; recipe shuffling seed).
        challenge_splits: use the challenge's own train/valid/test distributions (module doc).
        progress_signal: "auto", "score" or "plan" (module docstring).
        num_train_games, num_dev_games, num_test_games, seed, cache_dir, max_steps,
        show_admissible, invalid_to_engine, progress: as in `TextWorldEnv` (cache_dir defaults
            to `~/.cache/spa-rl/twchallenge`).
    """

    def __init__(self, challenge: str = "coin_collector", level: int = 5, rewards: str = "dense",
                 goal: str = "detailed", recipe: int = 1, take: int = 1, go: int = 1,
                 open: bool = False, cook: bool = False, cut: bool = False, drop: bool = False,
                 recipe_seed: int = 0, challenge_splits: bool = True, progress_signal: str = "auto",
                 num_train_games: int = 20, num_dev_games: int = 5, num_test_games: int = 10,
                 seed: int = 0, cache_dir: str | None = None, max_steps: int = 30,
                 show_admissible: bool = True, invalid_to_engine: bool = False, progress: bool = True):
        self.settings = challenge_settings(challenge, level, rewards, goal, recipe, take, go, open,
                                           cook, cut, drop, recipe_seed)
        if progress_signal not in ("auto", "score", "plan"):
            raise EnvError(f"env.progress_signal={progress_signal!r}: choose auto, score or plan")
        counts = {"train": num_train_games, "dev": num_dev_games, "test": num_test_games}
        for name, value, low in [("num_train_games", num_train_games, 1), ("num_dev_games", num_dev_games, 0),
                                 ("num_test_games", num_test_games, 0), ("max_steps", max_steps, 1)]:
            if not isinstance(value, int) or value < low:
                raise EnvError(f"env.{name}={value!r}: must be an integer >= {low}")
        self.challenge, self.challenge_splits, self.progress_signal = challenge, challenge_splits, progress_signal
        self._tw = _import_textworld()
        import textworld.challenges  # noqa: PLC0415, F401  (registers the challenges)

        self.max_steps, self.show_admissible, self.invalid_to_engine = max_steps, show_admissible, invalid_to_engine
        # progress comes from _progress (score or plan), the plan tracked by TextWorldEnv._absorb
        self.plan_progress, self._plan, self._plan0, self._lost = False, None, 1, False
        root = Path(cache_dir) if cache_dir else (
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spa-rl" / "twchallenge")
        key = json.dumps([_FORMAT_VERSION, challenge, self.settings, challenge_splits, self._tw.__version__])
        self.cache_dir = root / f"{challenge}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.num_generated = 0
        # the split each game seed was drawn for (seeds are hashes of (seed, split, k): distinct)
        self._seed_split = {game_seed(seed, s, k): s for s in SPLITS for k in range(10 * counts[s] + 20)}
        self._games = self._select_games(counts, seed, (challenge, self.settings), progress)
        self.system_prompt = (
            f"You are playing a text adventure game: {_GOALS[challenge]}. The first message tells you "
            "your goal; each later message tells you what happened after your last command"
            + (" and lists the commands available now" if show_admissible else "")
            + ". Reply with exactly one command on a single line, for example `go east` or "
            "`take coin` (you may write it as `Action: go east`), and nothing else.")
        self._env, self._env_path, self._admissible = None, None, {}
        self._steps, self._done, self._won = 0, True, False
        self._points, self._max_points, self._plan, self._plan0, self._lost = 0, 1, None, 1, False

    def _load_or_generate(self, seed: int, knobs: tuple) -> dict:
        meta = self._cached_meta(seed)
        if meta is not None:
            return meta
        self.num_generated += 1
        meta_path = self.cache_dir / f"{seed}.meta.json"
        settings = dict(self.settings)
        split = self._seed_split.get(seed, "train")
        if self.challenge_splits and self.challenge == "cooking":
            settings["split"] = _COOKING_SPLITS[split]
        if self.challenge_splits and self.challenge == "simple":
            settings["test"] = split == "test"
        opts = self._tw.GameOptions()
        opts.seeds = seed
        opts.force_recompile = True
        try:
            game = self._tw.challenges.CHALLENGES["tw-" + self.challenge][1](settings, opts)
        except Exception as e:  # a challenge may fail to build a world for a seed: skip it
            meta = {"seed": seed, "rejected": f"{type(e).__name__}: {e}"}
            _write_json_atomic(meta_path, meta)
            return meta
        return _save_game(self._tw, self.cache_dir, seed, game, opts)

    # --- progress ---------------------------------------------------------------------------

    def _env_infos(self):
        infos = super()._env_infos()
        infos.policy_commands = True
        return infos

    def _absorb(self, state) -> None:
        super()._absorb(state)
        self._points, self._max_points = state["score"] or 0, max(1, state["max_score"] or 1)

    def _progress(self) -> float:
        signal = self.progress_signal
        if signal == "auto":
            signal = "score" if self._max_points > 1 else "plan"
        if signal == "score" and not self._won:
            return min(1.0, max(0.0, self._points / self._max_points))
        return self._plan_fraction()

    def _info(self, valid: bool, lost: bool = False, truncated: bool = False) -> dict[str, Any]:
        info = super()._info(valid, lost=lost, truncated=truncated)
        info.update(progress=self._progress(), points=self._points, max_points=self._max_points)
        return info
