"""How faithful is the SPA estimator's credit to KeyDoor's true progress? Variants over seeds.

For each seed it runs sft + explore once (`<runs>/s<seed>/`; a variant that changes exploration
gets its own explore run beside it), then the progress stage per variant
(`<runs>/s<seed>_<variant>/`, linking the shared stages), and writes a table of the estimator's
faithfulness on its validation split (mean and 95% CI over seeds):

    python benchmarks/progress_faithfulness.py                       # 5 seeds, all variants
    python benchmarks/progress_faithfulness.py --variants act,obs --seeds 2

Resumable: a cell is done when its run dir holds `cell.json`. The numbers are recomputed from
each cell's saved estimator and explore trajectories (the same validation split the progress
stage held out), so every row is measured the same way whatever code version ran the stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from credit_modes import _fmt, _run, _train_cmd, mean_ci  # noqa: E402

# name -> (explore run tag or "" for the seed's own, explore overrides, progress overrides)
VARIANTS = {
    "act": ("", [], ["progress.read_at=action"]),
    "obs": ("", [], ["progress.read_at=observation"]),
    "actlr": ("", [], ["progress.read_at=action", "progress.lr=1e-3", "progress.epochs=10", "progress.patience=3"]),
    "obslr": ("", [], ["progress.read_at=observation", "progress.lr=1e-3", "progress.epochs=10",
                       "progress.patience=3"]),
    "state": ("", [], ["progress.read_at=state"]),
    "t1observation": ("t1base", ["explore.temperature=1.0"], ["progress.read_at=observation"]),
    # hotter explorations step onto the key and walk on more often: a potential can then tell
    # standing on the key from holding it (at 0.5 the explorer always took it right away)
    "t1state": ("t1base", ["explore.temperature=1.0"], ["progress.read_at=state"]),
}


def _link(d: Path, stage: str, target: Path) -> None:
    if not (d / stage).exists():
        (d / stage).symlink_to(target.resolve(), target_is_directory=True)


def run_variant(recipe: str, runs: Path, seed: int, name: str, overrides: list[str]) -> Path:
    tag, explore_over, progress_over = VARIANTS[name]
    base = runs / f"s{seed}"
    if not (base / "explore" / "DONE").exists():
        base.mkdir(parents=True, exist_ok=True)
        _run(_train_cmd(recipe, runs, base.name, seed, "sft,explore", overrides), runs / f"{base.name}.log")
    explore = base
    if tag:
        explore = runs / f"s{seed}_{tag}"
        if not (explore / "explore" / "trajectories").exists():
            explore.mkdir(parents=True, exist_ok=True)
            _link(explore, "sft", base / "sft")
            _run(_train_cmd(recipe, runs, explore.name, seed, "explore", overrides + explore_over),
                 runs / f"{explore.name}.log")
    d = runs / f"s{seed}_{name}"
    if (d / "cell.json").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    _link(d, "sft", base / "sft")
    _link(d, "explore", explore / "explore")
    wall = _run(_train_cmd(recipe, runs, d.name, seed, "progress", overrides + explore_over + progress_over),
                runs / f"{d.name}.log")
    (d / "cell.json").write_text(json.dumps({"seed": seed, "variant": name, "wall_s": wall}))
    return d


def measure(cell: Path) -> dict:
    """Faithfulness of the cell's estimator on the progress stage's validation split."""
    import yaml

    from rl.credit import ProgressEstimator, predict_progress, trajectory_faithfulness
    from rl.credit.progress import _split
    from rl.models import load_tokenizer
    from rl.trajectory import load_trajectories

    cfg = yaml.safe_load((cell / "config.yaml").read_text())
    trajs = load_trajectories(cell / "explore" / "trajectories")
    _, val = _split(len(trajs), cfg["progress"]["val_fraction"], cfg["seed"] + cfg["progress"]["seed"])
    held = [trajs[i] for i in val]
    est = ProgressEstimator.load(cell / "progress" / "estimator")
    credits = predict_progress(est, load_tokenizer(str(cell / "sft" / "model")), held, batch_size=16)
    out = trajectory_faithfulness(held, credits)
    out["spearman_rel"] = out["spearman_true"] / out["spearman_true_max"]  # 1: as good as any untied credit
    rows = [json.loads(x) for x in (cell / "metrics.jsonl").read_text().splitlines()]
    if any(r.get("progress/left_out_too_long") for r in rows):
        raise ValueError(f"{cell}: trajectories were left out of the fit; its validation split cannot be rebuilt here")
    best = [r for r in rows if "progress/best_val_loss" in r][-1]
    out["val_loss"], out["val_loss_constant"] = best["progress/best_val_loss"], best["progress/val_loss_constant"]
    return out


def table(runs: Path, seeds: list[int], names: list[str]) -> str:
    cols = [("spearman_true", "Spearman"), ("spearman_true_max", "ceiling"), ("spearman_rel", "Spearman / ceiling"),
            ("event_auc", "event AUC"),
            ("top_step_hit", "top step hit"), ("val_loss", "val loss"), ("val_loss_constant", "constant")]
    lines = ["| variant | seeds | " + " | ".join(c for _, c in cols) + " | wall s |", "|---" * (len(cols) + 3) + "|"]
    per_seed = ["", "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for name in names:
        cells = [runs / f"s{s}_{name}" for s in seeds]
        done = [c for c in cells if (c / "cell.json").exists()]
        if not done:
            continue
        m = [measure(c) for c in done]
        wall = np.mean([json.loads((c / "cell.json").read_text())["wall_s"] for c in done])
        lines.append(f"| {name} | {len(done)} | " + " | ".join(
            _fmt(*mean_ci([x[k] for x in m]), scale=1.0, digits=2) for k, _ in cols) + f" | {wall:.0f} |")
        by_seed = {c: x for c, x in zip(done, m)}
        per_seed.append(f"| {name} (Spearman / ceiling / top hit) | " + " | ".join(
            f"{by_seed[c]['spearman_true']:.2f} / {by_seed[c]['spearman_true_max']:.2f} / {by_seed[c]['top_step_hit']:.2f}"
            if c in by_seed else "" for c in cells) + " |")
    return "\n".join(lines + per_seed) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--recipe", default="recipes/quickstart.yaml")
    p.add_argument("--runs", default="runs/progress_faithfulness")
    p.add_argument("--out", default="benchmarks/results/progress_faithfulness.md")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every stage")
    p.add_argument("--report-only", action="store_true", help="only tabulate finished cells")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    seeds, runs = list(range(args.seeds)), Path(args.runs).resolve()
    if not args.report_only:
        for s in seeds:
            for v in names:
                run_variant(args.recipe, runs, s, v, args.overrides)
    setting = f"`{args.recipe}`" + (" with " + " ".join(f"`{o}`" for o in args.overrides) if args.overrides else "")
    text = (f"# Progress estimator vs true progress on {setting}\n\nSeeds {seeds}; validation split of each "
            f"seed's exploration; mean [95% CI] over seeds; runs in `{args.runs}`.\n\n"
            + table(runs, seeds, names))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
