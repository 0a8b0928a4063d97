"""Peak memory and CPU seconds of the score and update phases, A/B between two checkouts.

    python benchmarks/memory.py                                  # this checkout, issue-13 shape
    python benchmarks/memory.py --repos /path/to/old/checkout .  # side by side, interleaved

No generation: `train_rl` is fed fixed synthetic keydoor-like trajectories (`--episodes`
episodes of `--turns` turns; `train_throughput.synthetic_trajectories`), so the numbers isolate
scoring (old/reference log-probs) and the update. Each (repo, round) runs in its own process
(peak RSS is per process) and the repos alternate, so CPU contention hits both alike. Prints per
run: action and total tokens, peak RSS of the score and update phases (Linux VmHWM, reset at each
phase start) and their CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()


def child(args) -> None:
    sys.path.insert(0, str(Path(args.repo).resolve()))
    sys.path.insert(1, str(HERE.parent))
    import torch
    from accelerate import Accelerator
    from train_throughput import synthetic_trajectories

    from rl.models import ModelConfig, load_model, load_tokenizer
    from rl.tracking import Tracker, read_metrics
    from rl.trainers.ppo import PPOConfig, train_rl

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    policy = load_model(ModelConfig(name=args.model, lora=True, gradient_checkpointing=bool(args.grad_ckpt)), tok)
    trajs = synthetic_trajectories(args.episodes, args.turns)
    cfg = PPOConfig(algo="grpo", iterations=1, tasks_per_iter=args.episodes // 4, group_size=4, ppo_epochs=args.epochs,
                    minibatch_size=args.minibatch, grad_accum_steps=args.grad_accum, lr=1e-4, kl_coef=0.05,
                    eval_every=0, eval_at_start=False, save_every=10**9)
    if args.micro_tokens:  # an older checkout may not know the key
        cfg.micro_batch_tokens = args.micro_tokens
    rewards = lambda ts: [[0.0] * (t.num_steps - 1) + [t.outcome] for t in ts]  # noqa: E731
    acc = Accelerator(cpu=True)
    with tempfile.TemporaryDirectory() as run_dir:
        tracker = Tracker(run_dir, acc)
        train_rl(cfg, policy, tok, lambda model, tasks, seed: trajs, rewards, None, run_dir, acc, tracker,
                 tasks=[t.task for t in trajs])
        tracker.close()
        row = read_metrics(run_dir, "rl")[0]
    print("RESULT " + json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repos", nargs="+", default=[str(HERE.parents[1])])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--minibatch", type=int, default=32)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro-tokens", type=int, default=0, help="rl.micro_batch_tokens (0: off)")
    ap.add_argument("--grad-ckpt", type=int, default=0, help="1: model.gradient_checkpointing")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    print(f"{args.model} + LoRA, {args.episodes} synthetic episodes x {args.turns} turns, minibatch {args.minibatch}, "
          f"grad_accum {args.grad_accum}, {args.epochs} epoch(s), GRPO + KL (reference pass), {args.threads} threads, "
          f"micro_batch_tokens {args.micro_tokens}, gradient checkpointing {bool(args.grad_ckpt)}")
    print(f"{'repo':<40} {'action':>6} {'tokens':>6} | {'score GiB':>9} {'update GiB':>10} | {'score cpu s':>11} "
          f"{'update cpu s':>12}")
    results: dict[str, list[dict]] = {r: [] for r in args.repos}
    for _ in range(args.rounds):
        for repo in args.repos:
            cmd = [sys.executable, str(HERE), "--child", "--repo", repo] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in ("model", "episodes", "turns", "minibatch", "grad_accum", "epochs", "threads", "micro_tokens",
                         "grad_ckpt")]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": repo})
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{repo:<40} failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(line[7:])
            results[repo].append(r)
            tokens = r["prompt_tokens"] + r["observation_tokens"] + r["action_tokens"]
            print(f"{repo[-40:]:<40} {r['action_tokens']:>6} {tokens:>6} | {r['score_peak_rss_gib']:>9.2f} "
                  f"{r['update_peak_rss_gib']:>10.2f} | {r.get('score_cpu_time', float('nan')):>11.1f} "
                  f"{r.get('update_cpu_time', float('nan')):>12.1f}", flush=True)
    if len(args.repos) == 2 and all(results.values()):
        a, b = (results[r] for r in args.repos)
        mean = lambda rows, k: sum(x.get(k, float("nan")) for x in rows) / len(rows)  # noqa: E731
        print("ratios first/second: " + ", ".join(
            f"{k} {mean(a, k) / mean(b, k):.1f}x" for k in ("score_peak_rss_gib", "update_peak_rss_gib",
                                                             "score_cpu_time", "update_cpu_time")))


if __name__ == "__main__":
    main()
