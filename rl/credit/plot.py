"""Per-step credit heat-map: for a few sample trajectories, the credit each mode gives each action."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from rl.credit.faithfulness import trajectory_increments
from rl.credit.modes import CreditConfig, step_rewards
from rl.trajectory import Trajectory


def _label(action: str, width: int = 18) -> str:
    text = " ".join(action.split()) or "(empty)"
    return text if len(text) <= width else text[: width - 1] + "…"


def heatmap_credits(trajs: Sequence[Trajectory], credit_cfg: CreditConfig) -> dict[str, list[list[float]]]:
    """The heat-map's rows: terminal and SPA credit (trajectories annotated with progress), `mc`
    only when `credit_cfg.gamma` < 1 (undiscounted it is R at every step, terminal's return-to-go,
    which tells a reader nothing), and the env's true progress increments when every trajectory
    has them."""
    rows = {m: step_rewards(trajs, replace(credit_cfg, mode=m)) for m in ("terminal", "spa")}
    if credit_cfg.gamma < 1:
        rows[f"mc (γ={credit_cfg.gamma:g})"] = step_rewards(trajs, replace(credit_cfg, mode="mc"))
    truth = [trajectory_increments(t) for t in trajs]
    if truth and all(d is not None for d in truth):
        rows["true Δprogress"] = [d.tolist() for d in truth]
    return rows


def credit_heatmap(trajs: Sequence[Trajectory], credits_by_mode: dict[str, list[list[float]]], path: str | Path,
                   max_trajs: int = 4) -> Path:
    """Write a PNG with one panel per trajectory (the first `max_trajs`): actions along x, credit
    modes along y, cell colour = the step's credit, value printed in the cell.

    credits_by_mode[mode][i] holds the per-step credits of trajs[i] (as `step_rewards` returns).
    A diverging colour map centred on 0 is shared by all panels, so signs and sizes compare.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    sample = list(trajs)[:max_trajs]
    if not sample or not credits_by_mode:
        raise ValueError("credit_heatmap needs at least one trajectory and one credit mode")
    modes = list(credits_by_mode)
    for mode, per_traj in credits_by_mode.items():
        if len(per_traj) < len(sample):
            raise ValueError(f"credit mode {mode!r} has {len(per_traj)} trajectories, {len(sample)} plotted")
        for t, c in zip(sample, per_traj):
            if len(c) != t.num_steps:
                raise ValueError(f"credit mode {mode!r}: {len(c)} values for trajectory {t.traj_id} "
                                 f"with {t.num_steps} steps")
    grids = [np.array([credits_by_mode[m][i] for m in modes], dtype=float) for i in range(len(sample))]
    vmax = max(float(np.abs(g).max()) for g in grids) or 1.0
    norm = TwoSlopeNorm(vmin=-vmax, vcenter=0.0, vmax=vmax)
    widest = max(t.num_steps for t in sample)
    fig, axes = plt.subplots(len(sample), 1, squeeze=False,
                             figsize=(max(6.0, 0.9 * widest + 2.0), (0.45 * len(modes) + 1.6) * len(sample)))
    fig.subplots_adjust(hspace=0.6)  # room for the rotated action labels above the next title
    image = None
    for ax, traj, grid in zip(axes[:, 0], sample, grids):
        image = ax.imshow(grid, cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_yticks(range(len(modes)), modes)
        ax.set_xticks(range(traj.num_steps), [_label(s.action) for s in traj.steps], rotation=35, ha="right",
                      fontsize=8)
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
        status = "won" if traj.success else "lost"
        ax.set_title(f"trajectory {traj.traj_id} ({traj.task}, {status}, R={traj.outcome:.2f})", fontsize=9)
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.8, label="credit")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
