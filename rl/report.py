"""`report.html` for a run dir: learning curves per stage, success before/after, credit heat-map.

    python -m rl.report runs/quickstart
"""

from __future__ import annotations

import html
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from rl.tracking import read_metrics

# metrics worth a curve, by stage; others stay in metrics.jsonl
_CURVES = {
    "sft": ["sft/loss"],
    "progress": ["progress/train_loss", "progress/val_loss"],
    "rl": ["reward", "success", "grounding_accuracy", "kl_ref", "entropy", "value_loss", "clip_frac"],
    "eval": ["eval/success_rate", "eval/grounding_accuracy", "eval/mean_turns"],  # during rl
    "dpo": ["dpo/loss", "dpo/rewards/margins"],
}


def _series(rows: list[dict], stage: str) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for r in rows:
        # the eval stage's own rows (policy=...) are a table, not a curve
        if r.get("stage") != stage or "policy" in r:
            continue
        for k, v in r.items():
            if k in ("stage", "step") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                continue
            out[k][0].append(r["step"])
            out[k][1].append(v)
    return out


def plot_stage(rows: list[dict], stage: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(rows, stage)
    wanted = [k for k in _CURVES.get(stage, []) if k in series] or sorted(series)[:6]
    wanted = [k for k in wanted if len(series[k][0]) > 1]
    if not wanted:
        return False
    fig, axes = plt.subplots(1, len(wanted), figsize=(3.6 * len(wanted), 3), squeeze=False)
    for ax, key in zip(axes[0], wanted):
        xs, ys = series[key]
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_success(results: dict[str, dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return False
    labels = list(results)
    keys = ["eval/success_rate", "eval/grounding_accuracy"]
    fig, ax = plt.subplots(figsize=(4.5, 3))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ax.bar([j + i * width for j in range(len(keys))], [results[label].get(k, 0) for k in keys], width, label=label)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(keys))], [k.split("/")[1] for k in keys])
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("held-out evaluation")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows = read_metrics(run_dir)
    parts = [f"<h1>Run {html.escape(run_dir.name)}</h1>"]
    results_path = run_dir / "eval" / "results.json"
    if results_path.exists():
        results = json.loads(results_path.read_text())
        parts.append("<h2>Held-out evaluation</h2><table border=1 cellpadding=4><tr><th>policy</th>"
                     + "".join(f"<th>{html.escape(k)}</th>" for k in next(iter(results.values())))
                     + "</tr>")
        for label, m in results.items():
            parts.append(f"<tr><td>{html.escape(label)}</td>" + "".join(
                f"<td>{v:.3f}</td>" if isinstance(v, (int, float)) else f"<td>{html.escape(str(v))}</td>"
                for v in m.values()) + "</tr>")
        parts.append("</table>")
        if plot_success(results, plots / "success.png"):
            parts.append('<img src="plots/success.png">')
    faithful = [r for r in rows if r.get("stage") == "progress" and "progress/spearman_true" in r]
    if faithful:  # the estimator's credit against the env's true progress (validation split)
        labels = {"progress/spearman_true": "Spearman(c_t, true increment)",
                  "progress/spearman_true_max": "its ceiling for the tied increments",
                  "progress/event_auc": "P(progress step credited above an idle step)",
                  "progress/top_step_hit": "won trajectories whose top-credit step is a progress event",
                  "progress/faithful_steps": "validation steps"}
        parts.append("<h2>Progress estimator vs true progress</h2><table border=1 cellpadding=4>" + "".join(
            f"<tr><td>{html.escape(label)}</td><td>{faithful[-1][k]:.3f}</td></tr>"
            for k, label in labels.items() if isinstance(faithful[-1].get(k), (int, float))) + "</table>")
    for stage in ("sft", "progress", "rl", "eval", "dpo"):
        if plot_stage(rows, stage, plots / f"{stage}_curves.png"):
            title = "held-out evaluation during rl" if stage == "eval" else stage
            parts.append(f"<h2>{title}</h2><img src='plots/{stage}_curves.png'>")
    if (plots / "credit_heatmap.png").exists():
        parts.append("<h2>Per-step credit (sample trajectories)</h2><img src='plots/credit_heatmap.png'>")
    for name in ("config.yaml", "provenance.json"):  # what ran, and what produced it (rl/provenance.py)
        if (run_dir / name).exists():
            parts.append(f"<h2>{name}</h2><pre>{html.escape((run_dir / name).read_text())}</pre>")
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text("<html><head><meta charset='utf-8'><title>spa-rl report</title></head><body>"
                   + "\n".join(parts) + "</body></html>")
    tmp.replace(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m rl.report RUN_DIR", file=sys.stderr)
        sys.exit(2)
    print(write_report(sys.argv[1]))
