"""Results table of finished runs: held-out success of the SFT policy and of the final policy, per
recipe and seed, and the mean change over seeds with a 95% confidence interval.

    python benchmarks/recipe_results.py runs/textworld_cpu_s0 runs/textworld_cpu_s1 ...

Each RUN_DIR is read as the pipeline leaves it:
    config.yaml        name (the recipe's name: runs are grouped by it, with any `_s<seed>` suffix
                       removed) and seed
    eval/results.json  {"sft": metrics, "<final>": metrics}: the last entry is the final policy
                       (rl, dpo, or sft itself when no later stage ran); success is
                       eval/success_rate on env.eval_split
    timing.json        wall seconds per finished stage, interrupted attempts included (rl.train writes
                       it); wall time is their sum
    eval/trajectories_<label>   the held-out episodes of each evaluated policy (read by --flips)
    metrics.jsonl      the RL stage's evaluations on dev and keep_best's choice (read by --dev)

The change is final - SFT in points of success rate (same seed, same held-out games), and its CI
is the t-interval  mean ± t_{0.975, n-1} · s / sqrt(n)  over the recipe's seeds (n/a below 2 seeds).

`--flips` pairs the two policies' episodes game by game: on 50 held-out games a change of a few
points is a couple of games, and a "+0" can hide a policy that wins other games than SFT. It
prints, per run, the games won by the final policy only (gained) and by SFT only (lost), and the
exact two-sided sign test on those discordant games (McNemar's exact test): the probability of a
split at least that uneven if each discordant game were a fair coin. It also counts each policy's
held-out actions the env accepted over all its games (`grounding_accuracy` of rl.eval).

`--paired` compares recipes seed by seed: for each pair of recipes (a, b) and each seed both ran,
final(a) - final(b) in points, with the t-interval over those seeds. Variants run from the same SFT
policy differ only by what came after it, so this difference has less noise than the two recipes'
changes read apart; the table says on how many of those seeds the SFT success was the same.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunResult:
    recipe: str
    seed: int
    split: str  # the split eval ran on
    sft: float | None  # success rate of the SFT policy (None: not evaluated)
    final: float  # success rate of the final policy
    final_label: str  # which policy is final: "rl", "dpo", "sft", ...
    wall_s: float | None  # sum of the stages' wall seconds (None: no timing.json)
    stage_s: dict[str, float]  # wall seconds per stage

    @property
    def change_points(self) -> float | None:
        return None if self.sft is None else 100.0 * (self.final - self.sft)


def recipe_name(name: str, seed: int) -> str:
    """Runs of one recipe over seeds are often named <name>_s<seed>: group them under <name>."""
    return re.sub(rf"_s(eed)?{seed}$", "", name)


def read_run(run_dir: Path) -> RunResult:
    import yaml

    run_dir = Path(run_dir)
    for need in ("config.yaml", "eval/results.json"):
        if not (run_dir / need).exists():
            raise FileNotFoundError(f"{run_dir}: no {need} (is it a finished run dir with an eval stage?)")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    if not results:
        raise ValueError(f"{run_dir}/eval/results.json is empty")
    final_label = list(results)[-1]
    sft = results["sft"]["eval/success_rate"] if "sft" in results else None
    timing_path = run_dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    stage_s = {k: float(v["wall_s"]) for k, v in timing.items() if "wall_s" in v}  # not a stage still running
    seed = int(cfg.get("seed", 0))
    return RunResult(recipe=recipe_name(str(cfg.get("name", run_dir.name)), seed), seed=seed,
                     split=str(cfg.get("env", {}).get("eval_split", "test")), sft=sft,
                     final=float(results[final_label]["eval/success_rate"]), final_label=final_label,
                     wall_s=sum(stage_s.values()) if stage_s else None, stage_s=stage_s)


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): mean ± t_{0.975, n-1} · s / sqrt(n); the bounds are nan for n < 2."""
    n = len(values)
    m = sum(values) / n if n else float("nan")
    if n < 2:
        return m, float("nan"), float("nan")
    from scipy.stats import t

    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * s / math.sqrt(n)
    return m, m - half, m + half


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _minutes(s: float | None) -> str:
    return "n/a" if s is None else f"{s / 60:.1f}"


def table(runs: list[RunResult]) -> str:
    """Markdown: one row per (recipe, seed), then one summary row per recipe."""
    runs = sorted(runs, key=lambda r: (r.recipe, r.seed))
    lines = ["| recipe | seed | split | SFT success | final success | change (points) | wall (min) |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        change = "n/a" if r.change_points is None else f"{r.change_points:+.1f}"
        lines.append(f"| {r.recipe} | {r.seed} | {r.split} | {_pct(r.sft)} | {_pct(r.final)} ({r.final_label}) "
                     f"| {change} | {_minutes(r.wall_s)} |")
    lines += ["", "| recipe | seeds | mean SFT | mean final | mean change (points) | 95% CI (t) | mean wall (min) |",
              "|---|---|---|---|---|---|---|"]
    for recipe in sorted({r.recipe for r in runs}):
        group = [r for r in runs if r.recipe == recipe]
        changes = [r.change_points for r in group if r.change_points is not None]
        m, lo, hi = mean_ci(changes) if changes else (float("nan"),) * 3
        sfts = [r.sft for r in group if r.sft is not None]
        walls = [r.wall_s for r in group if r.wall_s is not None]
        ci = "n/a" if math.isnan(lo) else f"[{lo:+.1f}, {hi:+.1f}]"
        lines.append(f"| {recipe} | {len(group)} | {_pct(sum(sfts) / len(sfts) if sfts else None)} "
                     f"| {_pct(sum(r.final for r in group) / len(group))} "
                     f"| {'n/a' if math.isnan(m) else f'{m:+.1f}'} | {ci} "
                     f"| {_minutes(sum(walls) / len(walls) if walls else None)} |")
    return "\n".join(lines)


def paired_table(runs: list[RunResult]) -> str:
    """Markdown: final(a) - final(b) in points per shared seed, and its mean with a t-interval, for
    every pair of recipes a < b (sorted by name) that share a seed."""
    by = {(r.recipe, r.seed): r for r in runs}
    recipes = sorted({r.recipe for r in runs})
    lines = ["| paired difference (final success, same seed) | seeds | same SFT success | per seed (points) "
             "| mean (points) | 95% CI (t) |", "|---|---|---|---|---|---|"]
    for i, a in enumerate(recipes):
        for b in recipes[i + 1:]:
            seeds = sorted(s for (rec, s) in by if rec == a and (b, s) in by)
            if not seeds:
                continue
            diffs = [100.0 * (by[a, s].final - by[b, s].final) for s in seeds]
            same = sum(by[a, s].sft is not None and by[a, s].sft == by[b, s].sft for s in seeds)
            m, lo, hi = mean_ci(diffs)
            ci = "n/a" if math.isnan(lo) else f"[{lo:+.1f}, {hi:+.1f}]"
            per_seed = " / ".join(f"{s}: {d:+.1f}" for s, d in zip(seeds, diffs))
            lines.append(f"| {a} - {b} | {len(seeds)} | {same} of {len(seeds)} | {per_seed} | {m:+.1f} | {ci} |")
    if len(lines) == 2:
        lines.append("| (no two recipes share a seed) | 0 | - | - | - | - |")
    return "\n".join(lines)


@dataclass
class Flips:
    recipe: str
    seed: int
    games: int  # held-out games both policies played
    both: int  # won by both
    gained: list[str]  # won by the final policy only
    lost: list[str]  # won by SFT only
    grounding: dict[str, float]  # "sft" / "final" -> share of its held-out actions the env accepted

    @property
    def p_value(self) -> float:
        return sign_test(len(self.gained), len(self.lost))


def sign_test(a: int, b: int) -> float:
    """Exact two-sided binomial test of a vs b successes at p = 1/2 (1.0 when a + b = 0)."""
    from scipy.stats import binomtest

    return 1.0 if a + b == 0 else float(binomtest(a, a + b, 0.5).pvalue)


def read_flips(run_dir: Path, run: RunResult | None = None) -> Flips:
    """Pair SFT's and the final policy's episodes of `run_dir` (`run`: its read_run, if already read)."""
    from rl.eval import episode_metrics
    from rl.trajectory import load_trajectories

    run = run or read_run(run_dir)
    if run.final_label == "sft" or run.sft is None:
        raise ValueError(f"{run_dir}: --flips needs an SFT and a later policy in eval/results.json")
    won, grounding = {}, {}
    for label in ("sft", run.final_label):
        path = Path(run_dir) / "eval" / f"trajectories_{label}"
        if not path.exists():
            raise FileNotFoundError(f"{run_dir}: no eval/trajectories_{label} (needed by --flips)")
        trajs = load_trajectories(path)
        won[label] = {t.task: bool(t.success) for t in trajs}
        grounding[label] = episode_metrics(trajs, prefix="")["grounding_accuracy"]
    games = sorted(set(won["sft"]) & set(won[run.final_label]))
    a, b = won["sft"], won[run.final_label]
    return Flips(run.recipe, run.seed, len(games), sum(a[g] and b[g] for g in games),
                 [g for g in games if b[g] and not a[g]], [g for g in games if a[g] and not b[g]],
                 {"sft": grounding["sft"], "final": grounding[run.final_label]})


def flips_table(flips: list[Flips]) -> str:
    lines = ["| recipe | seed | games | won by both | gained (final only) | lost (SFT only) | sign test p "
             "| valid actions SFT | valid actions final |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(flips, key=lambda f: (f.recipe, f.seed)):
        lines.append(f"| {f.recipe} | {f.seed} | {f.games} | {f.both} | {len(f.gained)} | {len(f.lost)} "
                     f"| {f.p_value:.3f} | {_pct(f.grounding['sft'])} | {_pct(f.grounding['final'])} |")
    return "\n".join(lines)


def dev_curve(run_dir: Path) -> tuple[list[tuple[int, float]], int | None]:
    """The RL stage's evaluations on its dev split, [(iteration, success)], and the iteration
    rl.keep_best selected (None without keep_best), from run_dir/metrics.jsonl. The eval stage logs
    its test results under the same stage name, with the policy's label: those rows are skipped."""
    from rl.tracking import read_metrics

    evals = [(int(r["step"]), float(r["eval/success_rate"])) for r in read_metrics(run_dir, "eval")
             if "eval/success_rate" in r and "policy" not in r]
    chosen = [int(r["selected_iteration"]) for r in read_metrics(run_dir, "rl") if "selected_iteration" in r]
    return sorted(evals), (chosen[-1] if chosen else None)


def dev_table(run_dirs: list[Path], runs: list[RunResult]) -> str:
    lines = ["| recipe | seed | dev success at RL iterations | kept (keep_best) |", "|---|---|---|---|"]
    for d, r in sorted(zip(run_dirs, runs), key=lambda x: (x[1].recipe, x[1].seed)):
        evals, chosen = dev_curve(d)
        curve = " / ".join(f"{it}: {100 * x:.0f}%" for it, x in evals) or "-"
        lines.append(f"| {r.recipe} | {r.seed} | {curve} | {'-' if chosen is None else chosen} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished run directories (runs/<name>)")
    parser.add_argument("--stages", action="store_true", help="also print each run's wall minutes per stage")
    parser.add_argument("--dev", action="store_true",
                        help="also print each run's RL evaluations on dev and the iteration keep_best kept")
    parser.add_argument("--flips", action="store_true",
                        help="also pair SFT's and the final policy's held-out episodes game by game")
    parser.add_argument("--paired", action="store_true",
                        help="also print final(a) - final(b) per seed for every pair of recipes that share seeds")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(d) for d in args.run_dirs]
        flips = [read_flips(d, r) for d, r in zip(args.run_dirs, runs)] if args.flips else []
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"recipe_results: {e}", file=sys.stderr)
        return 2
    print(table(runs))
    if args.stages:
        print("\n| recipe | seed | " + " | ".join(["sft", "explore", "progress", "rl", "dpo", "eval"]) + " |")
        print("|---|---|" + "---|" * 6)
        for r in sorted(runs, key=lambda r: (r.recipe, r.seed)):
            cells = [_minutes(r.stage_s.get(s)) if s in r.stage_s else "-" for s in ("sft", "explore", "progress", "rl", "dpo", "eval")]
            print(f"| {r.recipe} | {r.seed} | " + " | ".join(cells) + " |")
    if args.dev:
        print("\n" + dev_table(args.run_dirs, runs))
    if flips:
        print("\n" + flips_table(flips))
    if args.paired:
        print("\n" + paired_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
