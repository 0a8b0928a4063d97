"""Credit modes: turn a batch of trajectories into per-step rewards r_{i,t}, one list per trajectory.

Notation: trajectory i has steps t = 0..T_i (T_i = its last step), outcome R_i (the final env
score), validity g_{i,t} = 1 if step t's action was executable else 0, group id k(i) (rollouts of
the same task in one batch share it).

    terminal  r_t = R·[t = T] - p·(1 - g_t)        (sparse, delayed reward; p = invalid_penalty, 0 by default)
    spa       r_t = alpha·c_t + beta·g_t (+ R·[t = T] with spa_add_outcome)   c_t: estimated progress
    mc        r_t = G_t = sum_{k>=t} gamma^(k-t) u_k,  u_k = R·[k = T] - p·(1 - g_k) (+ env reward of step k): a
              return, for heat-maps and analysis; the RL stage refuses it (its estimators sum
              rewards to go themselves: terminal with rl.gamma gives these returns there)
    gigpo     r_t = A^E_i + w·A^S_{i,t}          (an advantage, not a reward: see `gigpo_advantages`;
              A^S compares the returns G_t of mc, so p acts through the step level only)
    prm       r_t = s_t (+ R·[t = T] with prm_add_outcome)          s_t: any per-step scorer

The math lives in small pure functions over numpy arrays (`*_credit`, `discounted_returns`,
`gigpo_advantages`); `CREDIT_MODES` maps each mode name to a thin adapter of ONE signature,
`(trajs, cfg, scorer) -> list[list[float]]`, that pulls the arrays out of the trajectories and
calls the math. `step_rewards` validates the batch and dispatches through that dict.
"""

from __future__ import annotations

import importlib
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

from rl.trajectory import Trajectory, TrajectoryError, validate_trajectory

Scorer = Callable[[Trajectory], Sequence[float]]  # PRM-style: trajectory -> one score per step
CreditMode = Literal["terminal", "spa", "mc", "gigpo", "prm"]


@dataclass
class CreditConfig:
    mode: CreditMode = "spa"  # terminal | spa | mc | gigpo | prm (see the module docstring)
    alpha: float = 1.0  # spa: weight of the estimated progress c_t
    # spa: weight of the grounding bonus g_t. Small on purpose: beta·(number of valid steps) must
    # stay below the outcome scale, or walking around validly pays more than finishing the task.
    beta: float = 0.1
    spa_add_outcome: bool = False  # spa: also add R at the last step (c_t already sums to ~R)
    # terminal / mc / gigpo: subtracted at every step whose action the env refused. The grounding
    # signal without an estimator; a penalty, not a bonus, so that a longer episode is not paid more.
    invalid_penalty: float = 0.0
    gamma: float = 1.0  # mc / gigpo: discount of the per-step return G_t
    mc_env_rewards: bool = False  # mc / gigpo: add env step rewards to u_k (off: R already is the final score)
    gigpo_step_weight: float = 1.0  # gigpo: w in A = A^E + w·A^S
    gigpo_normalize_std: bool = True  # gigpo: divide both advantages by their group's std (+eps)
    prm_scorer: str = ""  # prm: "package.module:function", a `Scorer` (trajectory -> list[float])
    prm_add_outcome: bool = False  # prm: also add R at the last step

    def validate(self) -> None:
        if self.mode not in CREDIT_MODES:
            raise ValueError(f"credit.mode={self.mode!r}; choose one of {sorted(CREDIT_MODES)}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"credit.gamma={self.gamma}: must lie in [0, 1]")
        if not (math.isfinite(self.invalid_penalty) and self.invalid_penalty >= 0.0):
            raise ValueError(f"credit.invalid_penalty={self.invalid_penalty}: must be a number >= 0")
        if self.invalid_penalty and self.mode not in ("terminal", "mc", "gigpo"):
            raise ValueError(f"credit.invalid_penalty is used by credit.mode terminal, mc and gigpo only (here "
                             f"{self.mode!r}; spa's grounding term is credit.beta)")
        if self.mode == "prm" and self.prm_scorer and ":" not in self.prm_scorer:
            raise ValueError(f"credit.prm_scorer={self.prm_scorer!r}: expected 'package.module:function'")


# ---------------------------------------------------------------------------------------------
# Math: pure functions over per-step arrays


def terminal_credit(num_steps: int, outcome: float) -> np.ndarray:
    """(T+1,) zeros with R at the last step: r_t = R·[t = T]. Sums to R."""
    r = np.zeros(num_steps)
    r[-1] = outcome
    return r


def invalid_step_penalty(valid: np.ndarray, penalty: float) -> np.ndarray:
    """-p·(1 - g_t): valid g (S,) in {0, 1} -> (S,), -p at each refused action, 0 elsewhere."""
    return -penalty * (1.0 - np.asarray(valid, dtype=float))


def spa_credit(progress: np.ndarray, valid: np.ndarray, outcome: float, alpha: float, beta: float,
               add_outcome: bool) -> np.ndarray:
    """SPA step reward (Wang et al. 2025): r_t = alpha·c_t + beta·g_t (+ R·[t = T] if add_outcome).

    progress c (S,), valid g (S,) in {0, 1} -> (S,). With alpha=1, beta=0 and an estimator fit to
    sum_t c_t = R, the rewards sum to R.
    """
    r = alpha * np.asarray(progress, dtype=float) + beta * np.asarray(valid, dtype=float)
    if add_outcome:
        r[-1] += outcome
    return r


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Monte-Carlo return per step: G_t = sum_{k>=t} gamma^(k-t) u_k. u (S,) -> (S,)."""
    out = np.zeros(len(rewards))
    running = 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def prm_credit(scores: np.ndarray, outcome: float, add_outcome: bool) -> np.ndarray:
    """PRM-style step reward: r_t = s_t (+ R·[t = T] if add_outcome). scores (S,) -> (S,)."""
    r = np.array(scores, dtype=float)
    if add_outcome:
        r[-1] += outcome
    return r


def _group_centre(values: np.ndarray, keys: Sequence, normalize_std: bool, eps: float) -> np.ndarray:
    """x_j - mean_{j' : key j' = key j} x_j' (divided by that group's unbiased std + eps if asked).

    A group of one gets 0 (no comparison is possible); the std of a group of one counts as 0.
    """
    members: dict = defaultdict(list)
    for j, key in enumerate(keys):
        members[key].append(j)
    out = np.zeros(len(values))
    for idx in members.values():
        x = values[idx]
        centred = x - x.mean()
        if normalize_std:
            centred = centred / ((x.std(ddof=1) if len(x) > 1 else 0.0) + eps)
        out[idx] = centred
    return out


def gigpo_advantages(returns: Sequence[np.ndarray], outcomes: np.ndarray, group_ids: Sequence[int],
                     anchors: Sequence[Sequence[str]], step_weight: float, normalize_std: bool,
                     eps: float = 1e-6) -> list[np.ndarray]:
    """GiGPO-style two-level advantage (Feng et al. 2025, "Group-in-Group Policy Optimization").

    returns: G_{i,t} per trajectory (S_i,); outcomes R (B,); group_ids (B,); anchors: the state
    each step was taken in, as a key (S_i,) (`step_anchors`). Episode level, over group k:
        A^E_i = (R_i - mean_k R) / (std_k R + eps)        (no division when normalize_std=False)
    Step level, over the anchor-state group {(j, s) : k(j) = k(i), anchor_{j,s} = anchor_{i,t}}:
        A^S_{i,t} = (G_{i,t} - mean G) / (std G + eps)    (no division when normalize_std=False)
    Combined: A_{i,t} = A^E_i + step_weight·A^S_{i,t}. std is the unbiased sample std; a group of
    one (a lone rollout, or a state no other rollout visited) contributes 0 at its level.
    """
    ep = _group_centre(np.asarray(outcomes, dtype=float), list(group_ids), normalize_std, eps)
    flat = np.concatenate([np.asarray(g, dtype=float) for g in returns])
    keys = [(group_ids[i], a) for i, traj_anchors in enumerate(anchors) for a in traj_anchors]
    step = _group_centre(flat, keys, normalize_std, eps)
    out, start = [], 0
    for i, g in enumerate(returns):
        out.append(ep[i] + step_weight * step[start : start + len(g)])
        start += len(g)
    return out


def normalize_observation(text: str) -> str:
    """Anchor-state key: lower case, whitespace collapsed, outer whitespace stripped."""
    return re.sub(r"\s+", " ", text.strip().lower())


def step_anchors(traj: Trajectory) -> list[str]:
    """GiGPO's anchor state of each step: the env's own state key where it reports one
    (`info["state"]`, recorded by the rollout as the step's `state_before`), else the normalised
    observation. The observation is a weaker key: after a refused action most envs prefix their
    feedback ("Nothing happens: ..."), so a state revisited that way would start a group of its own."""
    return [f"state:{s.info['state_before']}" if "state_before" in s.info else normalize_observation(s.observation)
            for s in traj.steps]


# ---------------------------------------------------------------------------------------------
# Adapters: trajectories -> arrays -> math. One signature: (trajs, cfg, scorer) -> per-step lists


def _utilities(traj: Trajectory, env_rewards: bool, invalid_penalty: float) -> np.ndarray:
    u = terminal_credit(traj.num_steps, float(traj.outcome)) + invalid_step_penalty(_valid(traj), invalid_penalty)
    if env_rewards:
        u += np.array([float(s.reward) for s in traj.steps])
    return u


def _progress_of(traj: Trajectory) -> np.ndarray:
    if "progress" not in traj.annotations:
        raise TrajectoryError(
            f"trajectory {traj.traj_id} has no annotations['progress']; credit.mode='spa' needs the "
            "progress estimator to annotate it first (rl.credit.annotate_progress)"
        )
    c = np.asarray(traj.annotations["progress"], dtype=float)
    if not np.all(np.isfinite(c)):
        raise TrajectoryError(f"trajectory {traj.traj_id}: annotations['progress'] holds a non-finite value")
    return c


def _valid(traj: Trajectory) -> np.ndarray:
    return np.array([float(s.valid) for s in traj.steps])


def _terminal(trajs, cfg, scorer):
    return [_utilities(t, False, cfg.invalid_penalty) for t in trajs]


def _spa(trajs, cfg, scorer):
    return [spa_credit(_progress_of(t), _valid(t), float(t.outcome),
                       cfg.alpha, cfg.beta, cfg.spa_add_outcome) for t in trajs]


def _mc(trajs, cfg, scorer):
    return [discounted_returns(_utilities(t, cfg.mc_env_rewards, cfg.invalid_penalty), cfg.gamma) for t in trajs]


def _gigpo(trajs, cfg, scorer):
    returns = _mc(trajs, cfg, scorer)
    return gigpo_advantages(returns, np.array([float(t.outcome) for t in trajs]), [t.group_id for t in trajs],
                            [step_anchors(t) for t in trajs],
                            cfg.gigpo_step_weight, cfg.gigpo_normalize_std)


def _prm(trajs, cfg, scorer):
    if scorer is None:
        if not cfg.prm_scorer:
            raise ValueError("credit.mode='prm' needs a scorer: set credit.prm_scorer='package.module:function'")
        scorer = resolve_scorer(cfg.prm_scorer)
    out = []
    for t in trajs:
        scores = np.asarray(list(scorer(t)), dtype=float)
        if scores.shape != (t.num_steps,):
            raise TrajectoryError(f"trajectory {t.traj_id}: the PRM scorer gave {scores.size} scores "
                                  f"for {t.num_steps} steps")
        if not np.all(np.isfinite(scores)):
            raise TrajectoryError(f"trajectory {t.traj_id}: the PRM scorer gave a non-finite score")
        out.append(prm_credit(scores, float(t.outcome), cfg.prm_add_outcome))
    return out


ModeFn = Callable[[Sequence[Trajectory], CreditConfig, "Scorer | None"], list]

CREDIT_MODES: dict[str, ModeFn] = {
    "terminal": _terminal,
    "spa": _spa,
    "mc": _mc,
    "gigpo": _gigpo,
    "prm": _prm,
}


def resolve_scorer(spec: str) -> Scorer:
    """'package.module:function' -> the callable; fails with one line naming what is missing."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"credit.prm_scorer={spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"credit.prm_scorer={spec!r}: cannot import {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"credit.prm_scorer={spec!r}: {module_name!r} has no callable {attr!r}")
    return fn


def step_rewards(trajs: Sequence[Trajectory], cfg: CreditConfig, scorer: Scorer | None = None) -> list[list[float]]:
    """Per-step rewards for each trajectory under `cfg.mode` (one list per trajectory, len = steps).

    Every trajectory is validated first (zero steps, non-finite outcome/rewards, annotations whose
    length is not the step count): a bad one raises naming its id; none is dropped.
    """
    fn = CREDIT_MODES.get(cfg.mode)
    if fn is None:
        raise ValueError(f"credit.mode={cfg.mode!r}; choose one of {sorted(CREDIT_MODES)}")
    for t in trajs:
        validate_trajectory(t)
    out = [[float(x) for x in r] for r in fn(trajs, cfg, scorer)]
    for t, r in zip(trajs, out):
        if len(r) != t.num_steps or not all(math.isfinite(x) for x in r):
            raise TrajectoryError(f"trajectory {t.traj_id}: credit mode {cfg.mode!r} gave {r} for {t.num_steps} steps")
    return out
