"""Env steps/s: how fast every registered environment steps on its own, with no model in the loop.

Each env is built with its default options in a subprocess (so an env that needs data, a server,
Java or a slow game generator is reported as skipped or timed out rather than stalling the rest)
and plays its expert's actions over the train tasks, cycling, for about --seconds; every
--invalid-every-th step is replaced by a malformed reply (the path a policy's mistakes take).
Reported: env steps per second counting the time in reset() and step(), episodes, and the
expert's success (must be 1.0).

    python benchmarks/env_steps.py                         # every registered env
    python benchmarks/env_steps.py --envs maze wordle --seconds 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from envs import make_env, registered_names  # noqa: E402

MALFORMED = "I am not sure what to do here"


def measure(name: str, seconds: float, invalid_every: int, options: dict) -> dict:
    """Play expert episodes of env `name` for about `seconds`; return the counts and rates."""
    env = make_env(name, **options)
    tasks = env.tasks("train")
    plans = {t: env.expert_actions(t) for t in tasks}  # planned outside the timed loop
    steps = episodes = wins = 0
    busy = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for task in tasks:
            t0 = time.perf_counter()
            env.reset(task)
            done, info = False, {}
            for action in plans[task]:
                steps += 1
                if invalid_every and steps % invalid_every == 0:
                    env.step(MALFORMED)  # a wasted turn; the expert's action follows
                    steps += 1
                _, _, done, info = env.step(action)
                if done:
                    break
            busy += time.perf_counter() - t0
            episodes += 1
            wins += bool(info.get("won"))
            if time.perf_counter() > deadline:
                break
    return {"env": name, "steps": steps, "episodes": episodes, "seconds": round(busy, 3),
            "steps_per_s": round(steps / busy), "expert_success": round(wins / episodes, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", nargs="*", default=None, help="registered names (default: all)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed play per env")
    p.add_argument("--invalid-every", type=int, default=10, help="every n-th step is malformed (0: never)")
    p.add_argument("--timeout", type=float, default=120.0, help="per env, building it included")
    p.add_argument("--options", default="{}", help="JSON env options, for a single env")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.seconds, args.invalid_every, json.loads(args.options))))
        return
    print(f"{'env':<18} {'steps/s':>9} {'steps':>8} {'episodes':>8} {'expert':>6}  note")
    for name in args.envs or registered_names():
        cmd = [sys.executable, __file__, "--one", name, "--seconds", str(args.seconds),
               "--invalid-every", str(args.invalid_every), "--options", args.options]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            print(f"{name:<18} {'-':>9} {'-':>8} {'-':>8} {'-':>6}  timed out after {args.timeout:.0f}s")
            continue
        if res.returncode != 0:
            why = (res.stderr.strip().splitlines() or ["no output"])[-1][:100]
            print(f"{name:<18} {'-':>9} {'-':>8} {'-':>8} {'-':>6}  skipped: {why}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{name:<18} {r['steps_per_s']:>9,} {r['steps']:>8} {r['episodes']:>8} {r['expert_success']:>6.2f}")


if __name__ == "__main__":
    main()
