"""Credit assignment: per-step rewards from trajectories (`modes`), the SPA progress estimator
(`progress`), and the per-step credit heat-map (`plot`, imported on demand: it loads matplotlib)."""

from rl.credit.modes import (CREDIT_MODES, CreditConfig, Scorer, discounted_returns, gigpo_advantages,
                             normalize_observation, prm_credit, resolve_scorer, spa_credit, step_rewards,
                             terminal_credit)
from rl.credit.progress import (ProgressConfig, ProgressEstimator, annotate_progress, checked_view,
                                fit_progress_estimator, load_estimator_for, progress_loss)

__all__ = [
    "CREDIT_MODES", "CreditConfig", "Scorer", "discounted_returns", "gigpo_advantages", "normalize_observation",
    "prm_credit", "resolve_scorer", "spa_credit", "step_rewards", "terminal_credit",
    "ProgressConfig", "ProgressEstimator", "annotate_progress", "checked_view", "fit_progress_estimator",
    "load_estimator_for", "progress_loss",
]
