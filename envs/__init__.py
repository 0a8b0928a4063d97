"""Text environments for multi-turn agents. See `envs.base` for the protocol."""

from envs.base import SPLITS, EnvError, TextEnv, check_env, make_env, register, registered_names

__all__ = ["SPLITS", "EnvError", "TextEnv", "check_env", "make_env", "register", "registered_names"]
