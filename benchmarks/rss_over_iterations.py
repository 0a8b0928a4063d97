"""Does an RL run's memory stay flat? Peak resident memory per iteration, from the run's own log.

    python -m rl.train recipes/quickstart.yaml name=qs_rss stages=[rl] rl.iterations=50 \
        rl.keep_best=false rl.eval_every=0 resume=false rl.micro_batch_tokens=4096
    python benchmarks/rss_over_iterations.py runs/qs_rss   # (run dir whose sft/explore/progress exist)

Without the token budget a micro-batch of 16 rows is as large as its longest episodes make it,
and the peaks follow the batch's lengths (spread 31% against 6.5% with it; results/rss_over_iterations.txt).

Every RL iteration logs the peak RSS of each phase (`<phase>_peak_rss_gib`: Linux VmHWM, reset at
the phase start), so the largest of them is the iteration's peak. Prints one row per iteration
and, after the rows, the spread after a warm-up (`--after`, default 5): (max - min) / min of the
iteration peaks, which should stay within 10% if nothing accumulates across iterations, then
the CPU ms per token of each phase (what a memory setting costs in work).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PHASES = ("rollout", "credit", "score", "update")


def iteration_peaks(metrics_path: Path) -> list[tuple[int, dict[str, float]]]:
    """[(iteration, {phase: peak GiB})] of the rl stage, the last record of each iteration kept."""
    rows: dict[int, dict[str, float]] = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") != "rl" or "rollout_peak_rss_gib" not in rec:
            continue
        rows[int(rec["step"])] = {p: float(rec[f"{p}_peak_rss_gib"]) for p in PHASES if f"{p}_peak_rss_gib" in rec}
    return sorted(rows.items())


def cpu_ms_per_token(metrics_path: Path, after: int) -> dict[str, float]:
    """{phase: CPU ms per real token} over the rl iterations past `after`: what a memory setting
    (e.g. rl.micro_batch_tokens) costs in work, comparable across runs of different lengths."""
    rows: dict[int, dict] = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") == "rl" and "update_cpu_time" in rec and int(rec["step"]) > after:
            rows[int(rec["step"])] = rec
    tokens = sum(r["prompt_tokens"] + r["observation_tokens"] + r["action_tokens"] for r in rows.values())
    if not tokens:
        return {}
    return {p: 1e3 * sum(r.get(f"{p}_cpu_time", 0.0) for r in rows.values()) / tokens for p in PHASES}


def spread(peaks: list[float]) -> float:
    """(max - min) / min; nan for none."""
    return (max(peaks) - min(peaks)) / min(peaks) if peaks else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--after", type=int, default=5, help="iterations of warm-up left out of the spread")
    args = ap.parse_args(argv)
    path = Path(args.run_dir) / "metrics.jsonl"
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    rows = iteration_peaks(path)
    if not rows:
        print(f"error: {path} has no rl iterations with per-phase peak RSS", file=sys.stderr)
        return 2
    print(f"{'it':>4} " + " ".join(f"{p + ' GiB':>12}" for p in PHASES) + f" {'peak GiB':>9}")
    for it, ph in rows:
        print(f"{it:>4} " + " ".join(f"{ph.get(p, float('nan')):>12.3f}" for p in PHASES) + f" {max(ph.values()):>9.3f}")
    late = [max(ph.values()) for it, ph in rows if it > args.after]
    print(f"iterations {rows[0][0]}-{rows[-1][0]}: peak RSS after iteration {args.after} "
          f"{min(late, default=float('nan')):.3f}-{max(late, default=float('nan')):.3f} GiB, "
          f"spread {spread(late):.1%} (goal: within 10%)")
    # a spread can come from batches of different lengths; growth shows as a rising mean
    k = max(1, len(late) // 4)
    if len(late) >= 2 * k:
        first, last = sum(late[:k]) / k, sum(late[-k:]) / k
        print(f"trend: mean peak of the first {k} iterations after warm-up {first:.3f} GiB, "
              f"of the last {k} {last:.3f} GiB ({last / first - 1:+.1%})")
    ms = cpu_ms_per_token(path, args.after)
    if ms:
        print(f"CPU ms per token after iteration {args.after}: " + ", ".join(f"{p} {v:.3f}" for p, v in ms.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
