"""Is the estimated credit faithful to the environment's true progress?

Where an env reports its true progress p_t in each step's info (the value after action t, as
KeyDoor's `info["progress"]` does), the true contribution of step t is the increment

    d_t = p_t - p_{t-1}        p_{-1} = 0 (progress at reset)

and an estimator's credit c_t is faithful when it ranks the steps like d_t. Pure functions of
per-step arrays (numpy only):

    spearman_true      Spearman rank correlation between c and d, pooled over all steps of the
                       given trajectories (ties get average ranks)
    spearman_true_max  the most any real-valued credit can reach against this d: most d_t are
                       0 and tie, a credit that does not tie them exactly is capped at about
                       sqrt(1 - sum_k p_k^3) for the shares p_k of d's values (0.55 when 11% of
                       the steps are progress events, as in seed 0's quickstart exploration)
    event_auc          P(c_i > c_j) (+1/2 on ties) for a progress step i (d_i > 0) and a step j
                       that changed nothing (d_j = 0), pooled: 1 when every progress event gets
                       more credit than every idle step, 0.5 for credit unrelated to progress
    top_step_hit       share of won trajectories whose highest-credit step (first on ties) is a
                       true progress event, d_t > 0

Envs without progress in their infos give no increments (`trajectory_increments` -> None) and
no metrics.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rl.trajectory import Trajectory


def true_increments(progress: Sequence[float | None], start: float = 0.0) -> np.ndarray:
    """d_t = p_t - p_{t-1}, p_{-1} = start. progress (S,), None where a step reported none (an
    unparsable reply never reached the env: progress unchanged, carried forward) -> (S,)."""
    out, prev = np.zeros(len(progress)), float(start)
    for t, p in enumerate(progress):
        cur = prev if p is None else float(p)
        out[t], prev = cur - prev, cur
    return out


def trajectory_increments(traj: Trajectory, key: str = "progress") -> np.ndarray | None:
    """True per-step increments from the steps' infos, or None when no step carries `key`."""
    values = [s.info.get(key) for s in traj.steps]
    if all(v is None for v in values):
        return None
    return true_increments([None if v is None else float(v) for v in values])


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x (n,), ties sharing the mean of their ranks (as scipy's rankdata)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho = Pearson correlation of the average ranks; nan when either side is
    constant or has fewer than 2 values. x, y (n,) -> ()."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} vs {len(y)} values")
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def spearman_ceiling(d: Sequence[float]) -> float:
    """Spearman between d (n,) and d with its ties broken (by index): the largest value a credit
    without ties can reach against d."""
    d = np.asarray(d, dtype=float)
    return spearman(d, np.argsort(np.argsort(d, kind="mergesort"), kind="mergesort"))


def event_auc(c: Sequence[float], d: Sequence[float]) -> float:
    """Mann-Whitney AUC of c (n,) separating the steps with d > 0 from those with d = 0; nan when
    either set is empty. = (sum of the events' ranks among both sets - n1(n1+1)/2) / (n1 n0)."""
    c, d = np.asarray(c, dtype=float), np.asarray(d, dtype=float)
    pos, zero = c[d > 0], c[d == 0]
    if not len(pos) or not len(zero):
        return float("nan")
    ranks = average_ranks(np.concatenate([pos, zero]))[: len(pos)]
    return float((ranks.sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(zero)))


def top_step_hit(credits: Sequence[Sequence[float]], increments: Sequence[Sequence[float]]) -> float:
    """Share of trajectories whose argmax_t c_t (first on ties) has d_t > 0; nan for none.
    credits[i], increments[i] (S_i,)."""
    hits = [float(np.asarray(d)[int(np.argmax(c))] > 0) for c, d in zip(credits, increments) if len(c)]
    return float(np.mean(hits)) if hits else float("nan")


def faithfulness(credits: Sequence[Sequence[float]], increments: Sequence[Sequence[float] | None],
                 won: Sequence[bool]) -> dict[str, float]:
    """{"spearman_true", "spearman_true_max", "event_auc", "top_step_hit", "faithful_steps",
    "faithful_won"} over the trajectories
    that have increments (None: the env reports no progress); {} when none has.

    spearman_true pools (c_t, d_t) over all those trajectories' steps; top_step_hit uses the won
    ones (a lost trajectory may hold no progress event at all)."""
    keep = [i for i, d in enumerate(increments) if d is not None]
    if not keep:
        return {}
    for i in keep:
        if len(credits[i]) != len(increments[i]):
            raise ValueError(f"trajectory {i}: {len(credits[i])} credits for {len(increments[i])} increments")
    c = np.concatenate([np.asarray(credits[i], dtype=float) for i in keep])
    d = np.concatenate([np.asarray(increments[i], dtype=float) for i in keep])
    won_idx = [i for i in keep if won[i]]
    return {"spearman_true": spearman(c, d), "spearman_true_max": spearman_ceiling(d), "event_auc": event_auc(c, d),
            "top_step_hit": top_step_hit([credits[i] for i in won_idx], [increments[i] for i in won_idx]),
            "faithful_steps": float(len(c)), "faithful_won": float(len(won_idx))}


def trajectory_faithfulness(trajs: Sequence[Trajectory], credits: Sequence[Sequence[float]]) -> dict[str, float]:
    """`faithfulness` for trajectories (increments from their infos) and their per-step credits."""
    return faithfulness(credits, [trajectory_increments(t) for t in trajs], [bool(t.success) for t in trajs])
