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


def rl_iterations(metrics_path: Path) -> dict[int, dict]:
    """{iteration: its last rl record that carries per-phase peaks}, from a run's metrics.jsonl."""
    rows: dict[int, dict] = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") == "rl" and "rollout_peak_rss_gib" in rec:
            rows[int(rec["step"])] = rec
    return rows


def peaks(records: dict[int, dict]) -> list[tuple[int, dict[str, float]]]:
    """[(iteration, {phase: peak GiB})] of `rl_iterations` records, in iteration order."""
    return sorted((it, {p: float(rec[f"{p}_peak_rss_gib"]) for p in PHASES if f"{p}_peak_rss_gib" in rec})
                  for it, rec in records.items())


def iteration_peaks(metrics_path: Path) -> list[tuple[int, dict[str, float]]]:
    """[(iteration, {phase: peak GiB})] of the rl stage, the last record of each iteration kept."""
    return peaks(rl_iterations(metrics_path))


def cpu_ms_per_token(records: dict[int, dict], after: int) -> dict[str, float]:
    """{phase: CPU ms per real token} over the iterations past `after` (`rl_iterations`): what a
    memory setting (e.g. rl.micro_batch_tokens) costs in work, comparable across runs."""
    rows = [r for it, r in records.items() if it > after and "update_cpu_time" in r]
    tokens = sum(r["prompt_tokens"] + r["observation_tokens"] + r["action_tokens"] for r in rows)
    if not tokens:
        return {}
    return {p: 1e3 * sum(r.get(f"{p}_cpu_time", 0.0) for r in rows) / tokens for p in PHASES}


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
    records = rl_iterations(path)
    rows = peaks(records)
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
    ms = cpu_ms_per_token(records, args.after)
    if ms:
        print(f"CPU ms per token after iteration {args.after}: " + ", ".join(f"{p} {v:.3f}" for p, v in ms.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
