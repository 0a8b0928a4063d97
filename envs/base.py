"""The text-environment protocol, the registry, and `check_env`.

An environment is any object with this shape (Gymnasium-like, for text):

    env.tasks(split) -> list[str]                  # task ids of "train" / "test" (/ "dev")
    env.reset(task) -> (observation, info)         # first observation of that task
    env.step(action) -> (observation, reward, done, info)
    env.system_prompt: str                         # optional: instructions + action format shown to
                                                   #   the policy; default "" (no system message: the
                                                   #   conversation opens with the first observation)
    env.parse_action(reply) -> str | None          # optional: model reply -> action, None when
                                                   #   unparseable; default `first_command_line`
    env.expert_actions(task) -> list[str]          # optional: a winning action sequence (sft needs it)
    env.close()                                    # optional

`make_env` checks the three required methods (EnvError naming the missing one) and gives an env
without the optional attributes their defaults, so a plain class with tasks/reset/step runs.

`info` from `step` always carries `valid` (the action was executable: the grounding signal),
`won` (the task is solved) and `score` (the outcome so far, in [0, 1]). Environments may add keys
(e.g. `progress` for the toy env's ground truth, `admissible` for the valid-action list, `state`: a
string naming the env's state after reset/step, equal for equal states whatever the observation
says about how they were reached; GiGPO groups steps by it, see `rl.credit.modes.step_anchors`).

Rewards are delayed: the rollout takes the episode outcome from the final `info["score"]`, not
from summing `reward`, so an env may return 0 reward until the end.

Registration is by name: `@register("keydoor")` on a class, or a recipe may name any class as
`"my_pkg.my_module:MyEnv"` with no edit to the framework.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Protocol, runtime_checkable

SPLITS = ("train", "dev", "test")


@runtime_checkable
class TextEnv(Protocol):
    """The required part of the protocol; `make_env` adds `system_prompt` and `parse_action`."""

    def tasks(self, split: str) -> list[str]: ...

    def reset(self, task: str) -> tuple[str, dict[str, Any]]: ...

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]: ...


REQUIRED_METHODS = ("tasks", "reset", "step")


_REPLY_PREFIX = re.compile(r"^(action\s*:|>)\s*")


def first_command_line(reply: str) -> str | None:
    """The shared first half of every env's `parse_action`: the first non-empty line of a model
    reply, minus an 'Action:' or '>' prefix and quotes/punctuation at its ends, lower-cased with
    single spaces; None when the reply has no such line. Each env then checks its own grammar."""
    for line in (reply or "").splitlines():
        text = _REPLY_PREFIX.sub("", line.strip().lower())
        text = " ".join(text.strip(" \t.,;:!?'\"`*").split())
        if text:
            return text
    return None


class EnvError(RuntimeError):
    """An environment cannot start (missing data, bad options). The message says what to fix."""


_REGISTRY: dict[str, Callable[..., TextEnv]] = {}
# Built-in envs live in modules imported on first use, so `import envs` stays cheap and
# heavy engines (textworld, scienceworld) load only when asked for.
_BUILTIN_MODULES = {
    "keydoor": "envs.keydoor",
    "blocks": "envs.blocks",
    "textworld": "envs.textworld_env",
    "scienceworld": "envs.scienceworld_env",
    "alfworld": "envs.alfworld_env",
    "webshop": "envs.webshop_env",
    "chess": "envs.chess_env",
    "twchallenge": "envs.twchallenge_env",
    "maze": "envs.maze",
    "textnav": "envs.textnav",
    "twenty_questions": "envs.twenty_questions",
    "wordle": "envs.wordle",
}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make an env constructible by `make_env(name, **kwargs)`."""

    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_names() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def resolve_env_class(name: str) -> Callable[..., TextEnv]:
    """Map a registered short name or a `module.path:ClassName` to the env constructor."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise EnvError(f"env.name={name!r}: cannot import module {module_name!r} ({e})") from e
        if not hasattr(module, attr):
            raise EnvError(f"env.name={name!r}: module {module_name!r} has no attribute {attr!r}")
        return getattr(module, attr)
    raise EnvError(
        f"env.name={name!r} is not a registered environment; choose one of "
        f"{registered_names()} or give 'package.module:ClassName'"
    )


def make_env(name: str, **kwargs: Any) -> TextEnv:
    """Build an environment by registered name or `module:Class`, passing recipe options."""
    cls = resolve_env_class(name)
    try:
        env = cls(**kwargs)
    except TypeError as e:
        raise EnvError(f"env {name!r}: bad options {sorted(kwargs)}: {e}") from e
    return with_defaults(env, name)


def with_defaults(env: Any, name: str) -> TextEnv:
    """Check `env` has the protocol's required methods and give it the optional attributes'
    defaults (set on the instance): no system prompt, `first_command_line` as its parser."""
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(env, m, None))]
    if missing:
        raise EnvError(f"env {name!r} ({type(env).__name__}) has no {', '.join(m + '()' for m in missing)}; an env "
                       "needs tasks(split), reset(task) and step(action) (see envs/base.py)")
    if getattr(env, "system_prompt", None) is None:
        env.system_prompt = ""
    if not isinstance(env.system_prompt, str):
        raise EnvError(f"env {name!r}: system_prompt must be a str, got {type(env.system_prompt).__name__}")
    if getattr(env, "parse_action", None) is None:
        env.parse_action = first_command_line
    return env


def check_env(env: TextEnv, split: str = "train", max_tasks: int = 2) -> None:
    """Assert that `env` follows the protocol; raise AssertionError naming what is wrong.

    Runs a couple of episodes with the expert actions when the env offers them (they must win)
    and checks the info keys, types and that an unparseable reply is handled.
    """
    assert isinstance(getattr(env, "system_prompt", ""), str), "env.system_prompt must be a str"
    tasks = env.tasks(split)
    assert isinstance(tasks, list) and tasks, f"env.tasks({split!r}) must be a non-empty list"
    assert all(isinstance(t, str) for t in tasks), "task ids must be strings"
    parse_action = getattr(env, "parse_action", first_command_line)
    assert parse_action("") is None or isinstance(parse_action(""), str)
    for task in tasks[:max_tasks]:
        obs, info = env.reset(task)
        assert isinstance(obs, str) and obs, "reset must return a non-empty observation string"
        assert isinstance(info, dict), "reset must return an info dict"
        expert = getattr(env, "expert_actions", None)
        actions = expert(task) if expert is not None else []
        done, info = False, {}
        for action in actions:
            obs, reward, done, info = env.step(action)
            assert isinstance(obs, str), "step observation must be a str"
            assert isinstance(reward, (int, float)), "step reward must be a number"
            assert isinstance(done, bool), "step done must be a bool"
            for key in ("valid", "won", "score"):
                assert key in info, f"step info must carry {key!r}"
            assert info["valid"], f"expert action {action!r} was judged invalid on task {task!r}"
            if done:
                break
        if actions:
            assert done and info["won"], f"expert actions did not win task {task!r}"
            assert 0.0 <= float(info["score"]) <= 1.0, "info['score'] must lie in [0, 1]"
