"""Trainers: visible loops over `rl.algos` (PPO/GRPO/RLOO here; SFT and DPO beside them)."""
