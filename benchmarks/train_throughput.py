"""PPO update throughput vs the machine's matmul peak, in one run.

    python benchmarks/train_throughput.py --model tiny
    python benchmarks/train_throughput.py --model smollm2-135m --batch 16 --turns 6

1. peak: the best of a few timed n x n fp32 matmuls (2 n^3 FLOPs each) on the training device;
2. update tokens/s: `train_rl` itself, fed fixed synthetic multi-turn trajectories (so no
   generation time is involved), read from its `tokens_per_s` metric (non-padding tokens through
   forward + backward + optimizer step, all PPO epochs, scoring pass excluded); the first
   iteration is a warm-up and is not counted;
3. model-FLOPs utilisation = 6 * N * tokens/s / peak, N = the policy's parameter count (forward
   2N + backward 4N FLOPs per token; attention FLOPs are ignored, as usual for MFU).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.models import ModelConfig, load_model, load_tokenizer  # noqa: E402
from rl.trajectory import Step, Trajectory  # noqa: E402

MOVES = ("go north", "go south", "go east", "go west", "take key", "open door")


def matmul_peak_flops(device: str, n: int = 2048, repeats: int = 5) -> float:
    """Best observed FLOP/s of an n x n fp32 matmul."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.matmul(a, b)  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def synthetic_trajectories(n: int, turns: int, seed: int = 0) -> list[Trajectory]:
    rng = random.Random(seed)
    prompt = ("You are an agent in a grid of rooms. Find the key, take it, walk to the door and open it. "
              "Reply with exactly one action per turn: go north, go south, go east, go west, take key, open door.")
    trajs = []
    for i in range(n):
        steps = [Step(f"The key is {rng.randint(1, 3)} steps north and {rng.randint(1, 3)} steps east. "
                      f"The door is {rng.randint(1, 3)} steps south.", rng.choice(MOVES), True)
                 for _ in range(turns)]
        trajs.append(Trajectory(i, f"train-{i}", steps, float(rng.random() < 0.5), False, group_id=i // 4,
                                system_prompt=prompt))
    return trajs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | smollm2-135m | a checkpoint dir")
    ap.add_argument("--batch", type=int, default=16, help="trajectories per iteration")
    ap.add_argument("--minibatch", type=int, default=8, help="trajectories per optimizer step")
    ap.add_argument("--turns", type=int, default=8, help="steps per trajectory")
    ap.add_argument("--epochs", type=int, default=2, help="PPO epochs")
    ap.add_argument("--iterations", type=int, default=3, help="iterations (the first is warm-up)")
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--lora", action="store_true")
    args = ap.parse_args()

    from accelerate import Accelerator

    from rl.tracking import Tracker, read_metrics
    from rl.trainers.ppo import PPOConfig, train_rl

    acc = Accelerator()
    device = str(acc.device)
    peak = matmul_peak_flops(device, args.matmul_n)
    tok = load_tokenizer(args.model)
    policy = load_model(ModelConfig(name=args.model, lora=args.lora), tok)
    n_params = sum(p.numel() for p in policy.parameters())
    trajs = synthetic_trajectories(args.batch, args.turns)
    cfg = PPOConfig(algo="ppo", iterations=args.iterations, tasks_per_iter=args.batch // 4, group_size=4,
                    ppo_epochs=args.epochs, minibatch_size=args.minibatch, lr=1e-6, eval_every=0,
                    eval_at_start=False, save_every=10**9, max_length=4096)
    rewards = lambda ts: [[0.0] * (t.num_steps - 1) + [t.outcome] for t in ts]  # noqa: E731
    with tempfile.TemporaryDirectory() as run_dir:
        tracker = Tracker(run_dir, acc)
        train_rl(cfg, policy, tok, lambda model, tasks, seed: trajs, rewards, None, run_dir, acc, tracker,
                 tasks=[t.task for t in trajs])
        tracker.close()
        rows = read_metrics(run_dir, "rl")[1:]
    tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
    mfu = 6 * n_params * tps / peak
    seq = sum(len(t.steps) for t in trajs) / len(trajs)
    print(f"device            {device} ({torch.get_num_threads()} threads)")
    print(f"matmul peak       {peak / 1e9:,.1f} GFLOP/s (fp32, n={args.matmul_n})")
    print(f"model             {args.model}{' + LoRA' if args.lora else ''}: {n_params / 1e6:.2f} M parameters")
    print(f"batch             {args.batch} trajectories x {seq:.0f} turns, minibatch {args.minibatch}, "
          f"{args.epochs} epochs, {rows[0]['action_tokens']} action tokens / iteration")
    print(f"update throughput {tps:,.0f} tokens/s")
    print(f"MFU               {mfu:.1%}  (6 N tokens/s / peak)")


if __name__ == "__main__":
    main()
