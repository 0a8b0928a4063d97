"""What the credit modes changed in the policy's behaviour on two-door KeyDoor (credit_modes.py's
`headroom` setting), read from the cells' held-out episodes (`eval/trajectories_*`):

    python benchmarks/keydoor_behaviour.py --runs runs/credit_modes --seeds 5 \
        --modes terminal,spa,mc,spa-mc --out benchmarks/results/keydoor_behaviour.md

Each test episode is one of five kinds (`episode_kind`):
    no key             never took the key
    first door         took the key and the first door it tried opened
    no door tried      took the key, tried no door and lost (timed out wandering)
    jammed, recovered  a door it tried was jammed, and it then opened the other one
    jammed, stuck      a door it tried was jammed, and it lost

Only the door choice after a jam can be learnt: the observation does not say which door opens, so
the share of episodes whose first door is jammed stays near one half of those that try one. The
table gives each kind's share (mean over seeds), the recovery rate (recovered / jammed), the
invalid `open door` retries at a jammed door per jammed episode, and the paired difference of the
recovery rate to `terminal` per seed, with 95% t intervals.

A jam shows in the observation that answers the step (the next step's observation), so a door
tried on an episode's very last step counts as no door tried (its answer is not stored).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import credit_modes  # noqa: E402  (its mean_ci and CI formatting, so both tables read alike)
from rl.trajectory import Trajectory, load_trajectories  # noqa: E402

KINDS = ("no key", "first door", "no door tried", "jammed, recovered", "jammed, stuck")
JAMMED = "does not open: it is jammed"  # keydoor's answer to the first try of a door that does not open
RETRY = "door is jammed"  # its answer to trying that door again


def _answers(traj: Trajectory) -> list[str]:
    """The env's answer to each step but the last: the observation the next step saw."""
    return [s.observation for s in traj.steps[1:]]


def episode_kind(traj: Trajectory) -> str:
    """One of KINDS for a KeyDoor episode (see the module docstring)."""
    took_key = any(s.info.get("progress", 0.0) >= 0.5 for s in traj.steps)
    jammed = any(JAMMED in a for a in _answers(traj))
    if not took_key:
        return "no key"
    if jammed:
        return "jammed, recovered" if traj.success else "jammed, stuck"
    return "first door" if traj.success else "no door tried"


def jammed_retries(traj: Trajectory) -> int:
    """`open door` steps answered with "the ... door is jammed": trying a known-jammed door again."""
    return sum(s.action.strip().lower().startswith("open door") and RETRY in a
               for s, a in zip(traj.steps, _answers(traj)))


def behaviour(trajs: list[Trajectory]) -> dict[str, float]:
    """Shares of KINDS, recovery rate, retries per jammed episode, mean steps of a won episode."""
    kind = [episode_kind(t) for t in trajs]
    kinds = Counter(kind)
    n = max(len(trajs), 1)
    jammed = [t for t, k in zip(trajs, kind) if k.startswith("jammed")]
    won = [t.num_steps for t in trajs if t.success]
    out = {k: kinds[k] / n for k in KINDS}
    out["success"] = sum(bool(t.success) for t in trajs) / n
    out["recovery"] = kinds["jammed, recovered"] / len(jammed) if jammed else float("nan")
    out["retries per jammed"] = sum(jammed_retries(t) for t in jammed) / len(jammed) if jammed else float("nan")
    out["steps when won"] = sum(won) / len(won) if won else float("nan")
    return out


COLUMNS = ("success", *KINDS, "recovery", "retries per jammed", "steps when won")


def collect(runs: Path, seeds: list[int], modes: list[str]) -> dict[tuple[int, str], dict[str, float]]:
    """(seed, mode) -> behaviour of its test episodes; mode "sft" is the SFT policy's episodes in
    the first mode's cell (every cell of a seed evaluates the same SFT policy)."""
    out = {}
    for s in seeds:
        for m in modes:
            d = runs / f"s{s}_{m}" / "eval"
            if (d / "trajectories_rl").exists():
                out[(s, m)] = behaviour(load_trajectories(d / "trajectories_rl"))
            if (s, "sft") not in out and (d / "trajectories_sft").exists():
                out[(s, "sft")] = behaviour(load_trajectories(d / "trajectories_sft"))
    return out


def table(data: dict, seeds: list[int], modes: list[str]) -> str:
    fmt = lambda c, v: f"{v:.2f}" if c in ("retries per jammed", "steps when won") else f"{100 * v:.0f}"
    lines = ["| policy | seeds | " + " | ".join(f"{c}{'' if c in ('retries per jammed', 'steps when won') else ', %'}"
                                                for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for m in ["sft", *modes]:
        rows = [data[(s, m)] for s in seeds if (s, m) in data]
        if rows:
            means = [statistics.fmean([r[c] for r in rows if r[c] == r[c]] or [float("nan")]) for c in COLUMNS]
            lines.append(f"| {m} | {len(rows)} | " + " | ".join(fmt(c, v) for c, v in zip(COLUMNS, means)) + " |")
    lines += ["", "| paired difference (same seed) | recovery after a jam, points (95% CI) | per seed |", "|---|---|---|"]
    for m in [x for x in ["sft", *modes] if x != "terminal"]:
        pairs = [(data[(s, m)]["recovery"], data[(s, "terminal")]["recovery"]) for s in seeds
                 if (s, m) in data and (s, "terminal") in data]
        diffs = [a - b for a, b in pairs if a == a and b == b]
        if diffs:
            per = " / ".join(f"{100 * d:+.0f}" for d in diffs)
            lines.append(f"| {m} - terminal | {credit_modes._fmt(*credit_modes.mean_ci(diffs), signed=True)} (n={len(diffs)}) | {per} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/credit_modes", help="credit_modes.py's --runs")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--modes", default="terminal,spa,mc,spa-mc")
    p.add_argument("--out", default="", help="also write the table here")
    args = p.parse_args(argv)
    modes, seeds = [m for m in args.modes.split(",") if m], list(range(args.seeds))
    data = collect(Path(args.runs), seeds, modes)
    if not data:
        print(f"error: no eval/trajectories_* under {args.runs}/s<seed>_<mode>/", file=sys.stderr)
        return 2
    text = table(data, seeds, modes)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(f"`python benchmarks/keydoor_behaviour.py --runs {args.runs} --seeds {args.seeds} "
                                  f"--modes {args.modes}`\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
