"""How GiGPO's step groups form: observation text vs the env's state key, under random play.

GiGPO compares the steps of a task's rollouts that were taken in the same state. Keyed by the
observation text, one state reached in different ways (after a move, after a refused action whose
feedback opens the observation) falls into several groups; keyed by `info["state"]` it is one.
For each env this prints, over `--groups` tasks x `--rollouts` random episodes each:

    steps in a group of 2+   share of steps that have another step of their task's rollouts in the
                             same group (a step alone in its group gets no step-level advantage)
    observation keys/state   distinct observation anchors per visited state (1 = no splitting)

    python benchmarks/anchor_groups.py                   # keydoor (headroom layouts) and blocks
    python benchmarks/anchor_groups.py --envs textworld  # the textworld_cpu games (generated if missing)
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict

from envs import make_env
from rl.credit.modes import normalize_observation

SETTINGS = {
    "keydoor": {"size": 3, "doors": 2, "num_train_tasks": 300, "num_dev_tasks": 0, "num_test_tasks": 0,
                "max_steps": 20},
    "blocks": {"num_blocks": 3, "max_steps": 6},
    "textworld": {"num_train_games": 60, "num_dev_games": 30, "num_test_games": 50, "quest_length": 3,
                  "world_size": 4, "nb_objects": 4, "max_steps": 8},
}


def random_action(name: str, env, info: dict, rng: random.Random) -> str:
    if name == "keydoor":
        from envs.keydoor import ACTIONS

        return rng.choice(ACTIONS)
    if name == "blocks":
        names = [chr(ord("a") + i) for i in range(env.num_blocks)]
        return f"move {rng.choice(names)} onto {rng.choice(names + ['table'])}"
    return rng.choice(info.get("admissible") or ["look"])


def anchor_stats(name: str, groups: int, rollouts: int, seed: int) -> tuple[float, float, float, int]:
    """(share of steps in an observation group of 2+, the same for state groups, mean observation
    keys per state, max of them) over `groups` train tasks x `rollouts` random episodes."""
    env = make_env(name, **SETTINGS[name])
    rng = random.Random(seed)
    shared = {"obs": [0, 0], "state": [0, 0]}
    splits: list[int] = []
    for task in env.tasks("train")[:groups]:
        visits = []
        for _ in range(rollouts):
            obs, info = env.reset(task)
            done = False
            while not done:
                visits.append((normalize_observation(obs), info["state"]))
                obs, _, done, info = env.step(random_action(name, env, info, rng))
        count = {"obs": defaultdict(int), "state": defaultdict(int)}
        keys_of_state = defaultdict(set)
        for o, s in visits:
            count["obs"][o] += 1
            count["state"][s] += 1
            keys_of_state[s].add(o)
        for o, s in visits:
            for kind, key in (("obs", o), ("state", s)):
                shared[kind][0] += count[kind][key] > 1
                shared[kind][1] += 1
        splits += [len(v) for v in keys_of_state.values()]
    if hasattr(env, "close"):
        env.close()
    return (shared["obs"][0] / shared["obs"][1], shared["state"][0] / shared["state"][1],
            sum(splits) / len(splits), max(splits))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", default="keydoor,blocks", help=f"comma-separated subset of {list(SETTINGS)}")
    p.add_argument("--groups", type=int, default=8, help="train tasks (one group each)")
    p.add_argument("--rollouts", type=int, default=8, help="random episodes per task")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print("| env | steps in a group of 2+, observation key | same, state key | observation keys per state (max) |")
    print("|---|---|---|---|")
    for name in args.envs.split(","):
        obs, state, mean, most = anchor_stats(name, args.groups, args.rollouts, args.seed)
        print(f"| {name} | {obs:.2f} | {state:.2f} | {mean:.2f} ({most}) |")


if __name__ == "__main__":
    main()
