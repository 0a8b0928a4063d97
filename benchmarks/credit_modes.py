"""Credit modes at equal budget, over seeds, with 95% confidence intervals.

For each seed it runs sft + explore + progress once (`<runs>/s<seed>/`), then for each mode the
rl + eval stages from that seed's SFT policy and estimator (`<runs>/s<seed>_<mode>/`, which links
the shared stages), and writes a markdown table of held-out success per mode, the paired
difference of each mode to `terminal` (same seed, same SFT policy), the estimator's faithfulness
to KeyDoor's true progress, and the wall time per cell:

    python benchmarks/credit_modes.py --quick          # 2 seeds, 4 RL iterations
    python benchmarks/credit_modes.py                  # 5 seeds, the quickstart's 12 RL iterations

Measured on 2 cores shared with other jobs: a --quick cell (rl + eval) took 150-500 s and a seed's
sft + explore + progress 3-6 min, so --quick with all six modes is about an hour (15 min with
`--modes terminal,spa` and little else running); the default budget was not run (a quickstart RL
stage is 5-15 min, so expect 4-8 hours for 30 cells).

Resumable: a cell is done when its own run dir holds `cell.json` (written after its eval stage);
re-running skips done cells and continues an interrupted RL stage from its checkpoint
(resume=true). The table is rebuilt from the run dirs alone (`--report-only`).

Modes (every cell gets the same rl.iterations, tasks, group size and epochs):
    terminal    credit.mode=terminal                       outcome at the last step
    spa         credit.mode=spa                            estimator fit once before RL
    spa-online  credit.mode=spa progress.refit_every=K     refit on RL's own rollouts every K its
    mc          credit.mode=terminal rl.gamma=0.9          Monte-Carlo returns G_t = 0.9^(T-t) R
    spa-mc      credit.mode=spa rl.gamma=0.9               SPA's dense rewards, returns discounted as mc's
    gigpo       credit.mode=gigpo rl.algo=gigpo            step groups over shared states
    ppo-critic  credit.mode=terminal rl.algo=ppo           a learnt critic (GAE) on the outcome
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "terminal": ["credit.mode=terminal"],
    "spa": ["credit.mode=spa"],
    "spa-online": ["credit.mode=spa", "progress.refit_every=2"],
    "mc": ["credit.mode=terminal", "rl.gamma=0.9"],  # Monte-Carlo returns 0.9^(T-t) R (see rl.train)
    # mc's discount on SPA's rewards: separates what the discount does from what the credit does
    "spa-mc": ["credit.mode=spa", "rl.gamma=0.9"],
    "gigpo": ["credit.mode=gigpo", "rl.algo=gigpo"],
    "ppo-critic": ["credit.mode=terminal", "rl.algo=ppo"],
}
# the task. `headroom` is KeyDoor with two doors, only one of which opens (the observation does not
# say which; the oracle knows): the SFT policy clones the oracle's door choice on the 100 demo
# layouts but cannot know it elsewhere, and its demos never show what to do after a jammed door,
# so it stays mid-range (held-out SFT 0.47 on seed 0; the table's `sft (start)` row has every
# seed) and whatever RL gains comes from its own exploration. RL draws from 300 train layouts, 200
# of them unseen by SFT, so it meets jammed doors as the test split does; it samples at
# temperature 1.0 in groups of 8 (at 0.5 the SFT policy's entropy was 0.05-0.1 nats per token and
# groups of 4 were near-identical). `quickstart` is the recipe as it is (SFT 0.37-0.95 over seeds)
SETTINGS = {
    "headroom": ["env.options.doors=2", "env.options.num_train_tasks=300", "env.num_demo_tasks=100",
                 "sft.epochs=20", "rollout.max_turns=20", "explore.rollouts_per_task=2",
                 "rollout.temperature=1.0", "rl.group_size=8", "rl.tasks_per_iter=8"],
    "quickstart": [],
}
QUICK = ["rl.iterations=4", "rl.eval_every=2", "progress.epochs=3", "eval.num_tasks=50"]
SHARED_STAGES = ("sft", "explore", "progress")


def t_quantile(n: int) -> float:
    """Two-sided 95% Student-t quantile for n samples (df = n - 1)."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def mean_ci(values) -> tuple[float, float, float]:
    """(mean, low, high): mean ± t_{0.975, n-1} · s / sqrt(n); the bounds are nan for n < 2."""
    x = np.asarray(values, dtype=float)
    m = float(x.mean()) if len(x) else float("nan")
    if len(x) < 2:
        return m, float("nan"), float("nan")
    half = t_quantile(len(x)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return m, m - half, m + half


def _run(cmd: list[str], log: Path) -> float:
    start = time.time()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc={rc}); see {log}")
    return time.time() - start


def _train_cmd(recipe: str, runs: Path, name: str, seed: int, stages: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "rl.train", recipe, f"seed={seed}", f"name={name}", f"output_dir={runs}",
            f"stages=[{stages}]", "resume=true", *overrides]


def run_base(recipe: str, runs: Path, seed: int, overrides: list[str]) -> Path:
    """sft + explore + progress for one seed, once."""
    d = runs / f"s{seed}"
    if not (d / "cell.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        wall = _run(_train_cmd(recipe, runs, d.name, seed, ",".join(SHARED_STAGES), overrides), runs / f"{d.name}.log")
        (d / "cell.json").write_text(json.dumps({"seed": seed, "wall_s": wall}))
    return d


def run_cell(recipe: str, runs: Path, seed: int, mode: str, overrides: list[str]) -> Path:
    """rl + eval for one (seed, mode) from the seed's shared stages."""
    base, d = runs / f"s{seed}", runs / f"s{seed}_{mode}"
    if (d / "cell.json").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    for stage in SHARED_STAGES:
        if not (d / stage).exists():
            (d / stage).symlink_to((base / stage).resolve(), target_is_directory=True)
    wall = _run(_train_cmd(recipe, runs, d.name, seed, "rl,eval", overrides + MODES[mode]), runs / f"{d.name}.log")
    (d / "cell.json").write_text(json.dumps({"seed": seed, "mode": mode, "wall_s": wall}))
    return d


def run_all(recipe: str, runs: Path, seeds: list[int], modes: list[str], overrides: list[str], jobs: int) -> list[str]:
    """Every seed's shared stages, then every (seed, mode) cell, `jobs` processes at a time. A
    failed cell is reported and the others go on; returns the failures (their table rows are missing)."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_base, recipe, runs, s, overrides): (s, "sft+explore+progress") for s in seeds}
        failed = _report(futures)
        futures = {pool.submit(run_cell, recipe, runs, s, m, overrides): (s, m)
                   for s in seeds if not any(f.startswith(f"seed {s} ") for f in failed) for m in modes}
        return failed + _report(futures)


def _report(futures: dict) -> list[str]:
    failed = []
    for f in as_completed(futures):
        s, what = futures[f]
        line = f"seed {s} {what}: {'done' if f.exception() is None else f.exception()}"
        print(line, flush=True)
        if f.exception() is not None:
            failed.append(line)
    return failed


def _last(run_dir: Path, key: str, stage: str | None = None) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    found = None
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if key in row and (stage is None or row.get("stage") == stage):
            found = row[key]
    return found


def collect(runs: Path, seeds: list[int], modes: list[str]) -> dict:
    """Every finished cell's numbers, read from its own run dir."""
    out: dict = {"cells": {}, "base": {}}
    for s in seeds:
        base = runs / f"s{s}"
        if (base / "cell.json").exists():
            info = json.loads((base / "cell.json").read_text())
            out["base"][s] = {"wall_s": info["wall_s"], "spearman": _last(base, "progress/spearman_true"),
                              "spearman_max": _last(base, "progress/spearman_true_max"),
                              "top_step_hit": _last(base, "progress/top_step_hit")}
        for m in modes:
            d = runs / f"s{s}_{m}"
            if not (d / "cell.json").exists():
                continue
            results = json.loads((d / "eval" / "results.json").read_text())
            out["cells"][(s, m)] = {"success": results["rl"]["eval/success_rate"],
                                    "sft": results.get("sft", {}).get("eval/success_rate"),
                                    "wall_s": json.loads((d / "cell.json").read_text())["wall_s"],
                                    "online_spearman": _last(d, "progress_online/spearman_true"),
                                    "online_spearman_max": _last(d, "progress_online/spearman_true_max")}
    return out


def _fmt(m: float, lo: float, hi: float, scale: float = 100.0, signed: bool = False, digits: int = 1) -> str:
    f = "{:" + ("+" if signed else "") + f".{digits}f" + "}"
    if math.isnan(lo):
        return f.format(scale * m)
    return f"{f.format(scale * m)} [{f.format(scale * lo)}, {f.format(scale * hi)}]"


def per_seed(data: dict, seeds: list[int], modes: list[str]) -> str:
    """Markdown: each seed's held-out success (%) at the start (SFT) and per mode, and its
    estimator's Spearman, so a mean can be read against the seeds it averages; `-` = not finished."""
    cells = data["cells"]
    online = any(cells.get((s, "spa-online"), {}).get("online_spearman") is not None for s in seeds)
    lines = ["| seed | sft | " + " | ".join(modes) + " | Spearman (ceiling) |"
             + (" spa-online, last RL batch |" if online else ""),
             "|---|---|" + "---|" * len(modes) + "---|" + ("---|" if online else "")]
    for s in seeds:
        sft = next((cells[(s, m)]["sft"] for m in modes if (s, m) in cells and cells[(s, m)]["sft"] is not None), None)
        row = [f"{100 * sft:.0f}" if sft is not None else "-"]
        row += [f"{100 * cells[(s, m)]['success']:.0f}" if (s, m) in cells else "-" for m in modes]
        b = data["base"].get(s)
        rho = (f"{b['spearman']:.2f} ({b['spearman_max']:.2f})"
               if b and b["spearman"] is not None and b["spearman_max"] is not None else "-")
        if online:
            c = cells.get((s, "spa-online"), {})
            rho += (f" | {c['online_spearman']:.2f} ({c['online_spearman_max']:.2f})"
                    if c.get("online_spearman") is not None and c.get("online_spearman_max") is not None else " | -")
        lines.append(f"| {s} | " + " | ".join(row) + f" | {rho} |")
    return "\n".join(lines) + "\n"


def paired_differences(modes: list[str]) -> list[tuple[str, str]]:
    """The (a, b) pairs the table reports a - b for: every mode against terminal, and the issue's
    two other questions, SPA against GiGPO and the online estimator against the offline one, and
    SPA's credit against plain discounting at the same discount."""
    pairs = [(m, "terminal") for m in modes if m != "terminal"]
    others = (("spa", "gigpo"), ("spa-online", "spa"), ("spa-mc", "mc"))
    return pairs + [(a, b) for a, b in others if a in modes and b in modes]


def table(data: dict, seeds: list[int], modes: list[str]) -> str:
    """Markdown: success per mode, paired differences (`paired_differences`), estimator faithfulness."""
    cells = data["cells"]
    lines = ["| mode | seeds | held-out success, % (95% CI) | wall time per cell, s |", "|---|---|---|---|"]
    sft = [cells[(s, m)]["sft"] for s in seeds for m in modes[:1] if (s, m) in cells and cells[(s, m)]["sft"] is not None]
    if sft:
        lines.append(f"| sft (start) | {len(sft)} | {_fmt(*mean_ci(sft))} | |")
    for m in modes:
        vals = [cells[(s, m)] for s in seeds if (s, m) in cells]
        if vals:
            lines.append(f"| {m} | {len(vals)} | {_fmt(*mean_ci([v['success'] for v in vals]))} | "
                         f"{np.mean([v['wall_s'] for v in vals]):.0f} |")
    lines += ["", "| paired difference (same seed) | points of success (95% CI) |", "|---|---|"]
    for a, b in paired_differences(modes):
        diffs = [cells[(s, a)]["success"] - cells[(s, b)]["success"] for s in seeds if (s, a) in cells and (s, b) in cells]
        if diffs:
            lines.append(f"| {a} - {b} | {_fmt(*mean_ci(diffs), signed=True)} (n={len(diffs)}) |")
    lines += ["", per_seed(data, seeds, modes).rstrip("\n")]
    base = [data["base"][s] for s in seeds if s in data["base"] and data["base"][s]["spearman"] is not None]
    if base:
        lines += ["", "| estimator (progress stage, validation split) | mean (95% CI) over seeds |", "|---|---|"]
        for key, label in (("spearman", "Spearman(c_t, true increment)"), ("spearman_max", "its ceiling for the ties"),
                           ("top_step_hit", "top step is a progress event (won)")):
            vals = [b[key] for b in base if b[key] is not None]
            if vals:
                lines.append(f"| {label} | {_fmt(*mean_ci(vals), scale=1.0, digits=2)} |")
        lines.append(f"| sft + explore + progress wall time, s | {np.mean([b['wall_s'] for b in base]):.0f} |")
    online = [cells[(s, 'spa-online')]["online_spearman"] for s in seeds
              if (s, "spa-online") in cells and cells[(s, "spa-online")]["online_spearman"] is not None]
    if online:
        lines.append(f"| spa-online: Spearman on the last RL batch | {_fmt(*mean_ci(online), scale=1.0, digits=2)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, short RL (" + " ".join(QUICK) + ")")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5, 2 with --quick)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {list(MODES)}")
    p.add_argument("--recipe", default="recipes/quickstart.yaml")
    p.add_argument("--setting", choices=list(SETTINGS), default="headroom",
                   help="overrides that set the task: " + "; ".join(f"{k}: {' '.join(v) or '(none)'}"
                                                                    for k, v in SETTINGS.items()))
    p.add_argument("--runs", default="runs/credit_modes", help="parent of the cells' run dirs")
    p.add_argument("--out", default="benchmarks/results/credit_modes.md")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every stage")
    p.add_argument("--report-only", action="store_true", help="rebuild the table from finished cells")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells run at once (each is one process; give the recipe num_threads=1 and keep "
                        "jobs <= cores, or they contend and the wall times mean little)")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    if "terminal" not in modes:
        modes.insert(0, "terminal")  # the paired differences need it
    seeds = list(range(args.seeds or (2 if args.quick else 5)))
    overrides = SETTINGS[args.setting] + (QUICK if args.quick else []) + args.overrides
    runs = Path(args.runs).resolve()
    if args.jobs < 1:
        p.error(f"--jobs={args.jobs}: must be >= 1")
    failed = [] if args.report_only else run_all(args.recipe, runs, seeds, modes, overrides, args.jobs)
    text = (f"# Credit modes on `{args.recipe}`\n\nSeeds {seeds}; overrides: `{' '.join(overrides) or '(none)'}`; "
            f"runs in `{args.runs}`.\n\n" + table(collect(runs, seeds, modes), seeds, modes))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
