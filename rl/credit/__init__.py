"""Credit assignment: per-step rewards from trajectories (`modes`), the SPA progress estimator
(`progress`, reading c_t where `readout` says), its faithfulness to an env's true progress
(`faithfulness`), and the per-step credit heat-map (`plot`, imported on demand: it loads matplotlib)."""

from rl.credit.modes import (CREDIT_MODES, CreditConfig, Scorer, discounted_returns, gigpo_advantages,
                             normalize_observation, prm_credit, resolve_scorer, spa_credit, step_rewards,
                             terminal_credit)
from rl.credit.faithfulness import faithfulness, trajectory_faithfulness, trajectory_increments
from rl.credit.progress import (ProgressConfig, ProgressEstimator, annotate_progress, checked_view,
                                fit_progress_estimator, load_estimator_for, predict_progress, progress_loss)

__all__ = [
    "CREDIT_MODES", "CreditConfig", "Scorer", "discounted_returns", "gigpo_advantages", "normalize_observation",
    "prm_credit", "resolve_scorer", "spa_credit", "step_rewards", "terminal_credit",
    "ProgressConfig", "ProgressEstimator", "annotate_progress", "checked_view", "fit_progress_estimator",
    "load_estimator_for", "predict_progress", "progress_loss",
    "faithfulness", "trajectory_faithfulness", "trajectory_increments",
]
