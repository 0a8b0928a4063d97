"""A tiny PPO run for `accelerate launch` (tests/test_launch.py runs it with 2 CPU processes).

Usage: ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/cpu_2proc.yaml tests/ppo_2proc_script.py RUN_DIR [ALGO]
Every process records what it would log and a checksum of its final weights in
RUN_DIR/rank{R}.json, so the test can check that all processes saw the same global batch.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))
import toy_letters as toy  # noqa: E402

from rl.models import load_tokenizer, tiny_model  # noqa: E402
from rl.tracking import Tracker  # noqa: E402
from rl.train import leave_process_group  # noqa: E402
from rl.trainers.ppo import PPOConfig, train_rl  # noqa: E402


class RecordingTracker(Tracker):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def log(self, metrics, stage, step):
        self.seen.append({"stage": stage, "step": step, **{k: float(v) for k, v in metrics.items()}})
        super().log(metrics, stage, step)


def main():
    run_dir = Path(sys.argv[1])
    algo = sys.argv[2] if len(sys.argv) > 2 else "ppo"
    torch.set_num_threads(1)
    acc = Accelerator()  # CPU processes: launch with ACCELERATE_USE_CPU=1 (see launch/cpu_2proc.yaml)
    tok = load_tokenizer("tiny")
    model = tiny_model(tok, seed=0)
    cfg = PPOConfig(algo=algo, iterations=2, tasks_per_iter=4, group_size=2, ppo_epochs=1, minibatch_size=4,
                    grad_accum_steps=2, lr=1e-3, eval_every=0, eval_at_start=False, save_every=1, kl_coef=0.0)
    tracker = RecordingTracker(run_dir, acc)
    policy = train_rl(cfg, model, tok, toy.make_rollout_fn(tok, cfg.group_size, accelerator=acc),
                      toy.step_rewards_correct, toy.make_eval_fn(tok, n=4, accelerator=acc), run_dir, acc,
                      tracker, tasks=[f"train-{i}" for i in range(8)])
    tracker.close()
    checksum = float(sum(p.detach().double().sum() for p in policy.parameters()))
    out = {"rank": acc.process_index, "world": acc.num_processes, "distributed_type": str(acc.distributed_type), "seen": tracker.seen, "checksum": checksum}
    (run_dir / f"rank{acc.process_index}.json").write_text(json.dumps(out))
    acc.wait_for_everyone()
    leave_process_group()


if __name__ == "__main__":
    main()
