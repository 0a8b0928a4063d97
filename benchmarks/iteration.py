"""One RL iteration on a real LM, phase by phase: time, peak memory and FLOP/s per phase.

    python benchmarks/iteration.py                       # SmolLM2-135M + LoRA, keydoor, 8 tasks x 4
    python benchmarks/iteration.py --num-envs 32 --minibatch 32 --grad-accum 4 --iterations 2

Runs `train_rl` itself (GRPO by default, KL to the LoRA-disabled base) with the real rollout
engine on keydoor, and reads the breakdown that every RL iteration logs: rollout, credit, score
(old/reference log-probs), update seconds; peak resident memory per phase (Linux VmHWM, reset at
each phase start); prompt/observation/action token counts. FLOP/s per phase are model FLOPs
against the machine's measured fp32 matmul peak (`train_throughput.matmul_peak_flops`):
  rollout  2 N (prompt + observation + action tokens)     (KV cache reused: each token fed once)
  score    2 N x tokens run                               (old and/or reference forwards)
  update   4 N x tokens run with LoRA, 6 N without        (forward 2N + backward: the input gradient 2N,
                                                          plus the weight gradient 2N only when the base
                                                          weights train; a frozen weight gets none)
where "tokens run" are the decoder tokens the phase really computed (`score_tokens_run`,
`update_tokens_run`: a group's shared prompt prefix is encoded once, so fewer than the batch's
real tokens times the passes); the work saved that way shows in the seconds, not in the FLOP/s.
with N the backbone's non-embedding parameters (the LM head runs at action positions only: 2 V H
per pass, 4 V H in a LoRA update where the tied head is frozen, 6 V H otherwise; its recompute in
backward is not counted, as MFU does not count recomputation), so the numbers are approximate and
comparable between runs, not exact hardware counts. LoRA's own matmuls (rank r) are not counted.

Hardware-independent, the script also prints the update in *forward passes per token*: the
update's seconds per token over the score phase's (a no-grad forward on the same tokens). The
floor is 2 with LoRA (forward + input gradient) and 3 without; above it is overhead (LoRA's
skinny matmuls and elementwise ops, the LM head's recompute, autograd). From it: the (score +
update) / rollout ratio the loop would have if the update ran at that floor.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import matmul_peak_flops  # noqa: E402

from envs import make_env  # noqa: E402
from rl.models import ModelConfig, load_model, load_tokenizer  # noqa: E402
from rl.phases import peak_rss_gib  # noqa: E402
from rl.rollout import RolloutConfig, collect_rollouts  # noqa: E402

PHASES = ("rollout", "credit", "score", "update")


def terminal_rewards(trajs):
    return [[0.0] * (t.num_steps - 1) + [float(t.outcome)] for t in trajs]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--no-lora", action="store_true", help="train all weights instead of a LoRA adapter")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: model.lora_r's default)")
    ap.add_argument("--env", default="keydoor")
    ap.add_argument("--env-options", default="size=3", help="k=v,... passed to the env")
    ap.add_argument("--algo", default="grpo")
    ap.add_argument("--tasks", type=int, default=8, help="tasks per iteration")
    ap.add_argument("--group", type=int, default=4, help="rollouts per task")
    ap.add_argument("--turns", type=int, default=8, help="rollout.max_turns")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--stop-at-newline", action="store_true",
                    help="rollout.stop_strings=['\\n']: replies end at their first line, as the real-LM recipes have it")
    ap.add_argument("--num-envs", type=int, default=32)
    ap.add_argument("--history-turns", type=int, default=0, help="rollout.history_turns (0: whole history)")
    ap.add_argument("--minibatch", type=int, default=32)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1, help="rl.ppo_epochs")
    ap.add_argument("--kl", type=float, default=0.05, help="rl.kl_coef")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro-tokens", type=int, default=0, help="rl.micro_batch_tokens (0: off)")
    ap.add_argument("--grad-ckpt", action="store_true", help="model.gradient_checkpointing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=2, help="print this many of the last iteration's sampled episodes")
    ap.add_argument("--matmul-n", type=int, default=1024)
    args = ap.parse_args(argv)
    if args.lora_r is not None and (args.lora_r < 1 or args.no_lora):
        ap.error(f"--lora-r {args.lora_r}: give a positive rank, and not with --no-lora")
    return args


def phase_flops(row: dict, n_params: int, head: int, lora: bool, epochs: int, episodes: int) -> dict[str, float]:
    """Model FLOPs of one iteration's rollout, score and update from its metrics row (the
    module docstring has the formulas); `head` = V x H of the LM head."""
    real = row["prompt_tokens"] + row["observation_tokens"] + row["action_tokens"]
    passes = row.get("score_sequences", 2 * episodes) / episodes  # forwards per trajectory in score
    per_token = 4 if lora else 6
    return {"rollout": 2 * n_params * real + 2 * head * row["action_tokens"],
            "score": 2 * n_params * row["score_tokens_run"] + passes * 2 * head * row["action_tokens"],
            "update": per_token * (n_params * row["update_tokens_run"] + epochs * head * row["action_tokens"])}


def forward_equivalents(row: dict, lora: bool) -> dict[str, float] | None:
    """The update's cost in no-grad forward passes per token, measured against the score phase
    of the same iteration (None when nothing was scored), its floor (2 with LoRA: forward + input
    gradient; 3 when the weights train too), and the (score + update) / rollout ratio the
    iteration would have if the update ran at that floor."""
    if not row.get("score_tokens_run") or not row.get("update_tokens_run") or row["score_time"] <= 0:
        return None
    fwd = row["score_time"] / row["score_tokens_run"]  # seconds per token of one forward
    floor = 2.0 if lora else 3.0
    return {"update_passes": row["update_time"] / (fwd * row["update_tokens_run"]), "floor": floor,
            "ratio_at_floor": (row["score_time"] + floor * fwd * row["update_tokens_run"])
            / max(row["rollout_time"], 1e-9)}


def env_options(text: str) -> dict:
    out = {}
    for kv in filter(None, text.split(",")):
        k, v = kv.split("=", 1)
        out[k] = int(v) if v.lstrip("-").isdigit() else v
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    from accelerate import Accelerator

    from rl.tracking import Tracker, read_metrics
    from rl.trainers.ppo import PPOConfig, train_rl

    torch.set_num_threads(args.threads)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    peak = matmul_peak_flops(str(acc.device), args.matmul_n)
    tok = load_tokenizer(args.model)
    mcfg = ModelConfig(name=args.model, lora=not args.no_lora, gradient_checkpointing=args.grad_ckpt)
    if args.lora_r is not None:
        mcfg.lora_r, mcfg.lora_alpha = args.lora_r, 2 * args.lora_r  # alpha / r = 2, as the recipes have it
    policy = load_model(mcfg, tok)
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    n_embed = base.get_input_embeddings().weight.numel()
    n_params = sum(p.numel() for p in base.parameters()) - n_embed  # tied head counted once, below
    opts = env_options(args.env_options)
    factory = lambda: make_env(args.env, **opts)  # noqa: E731
    tasks = factory().tasks("train")
    rcfg_kw = dict(max_turns=args.turns, max_new_tokens=args.max_new_tokens, num_envs=args.num_envs,
                   temperature=args.temperature)
    if args.history_turns:
        rcfg_kw["history_turns"] = args.history_turns
    if args.stop_at_newline:
        rcfg_kw["stop_strings"] = ["\n"]
    rcfg = RolloutConfig(**rcfg_kw)

    last_trajs: list = []

    def rollout_fn(model, batch_tasks, seed):
        trajs = collect_rollouts(model, tok, factory, batch_tasks, rcfg, group_size=args.group, seed=seed,
                                 accelerator=acc)
        last_trajs[:] = trajs
        return trajs

    cfg = PPOConfig(algo=args.algo, iterations=args.iterations, tasks_per_iter=args.tasks, group_size=args.group,
                    ppo_epochs=args.epochs, minibatch_size=args.minibatch, grad_accum_steps=args.grad_accum,
                    lr=1e-4, kl_coef=args.kl, eval_every=0, eval_at_start=False, save_every=10**9,
                    seed=args.seed, micro_batch_tokens=args.micro_tokens)
    extra = {"temperature": args.temperature}
    if args.history_turns:
        extra["history_turns"] = args.history_turns
    with tempfile.TemporaryDirectory() as run_dir:
        tracker = Tracker(run_dir, acc)
        train_rl(cfg, policy, tok, rollout_fn, terminal_rewards, None, run_dir, acc, tracker, tasks=tasks, **extra)
        tracker.close()
        rows = read_metrics(run_dir, "rl")

    head = n_embed  # (V, H) matmul at each scored position
    print(f"device       {acc.device} ({torch.get_num_threads()} threads), matmul peak "
          f"{peak / 1e9:,.1f} GFLOP/s (fp32, n={args.matmul_n})")
    print(f"model        {args.model}{'' if args.no_lora else f' + LoRA r={mcfg.lora_r}'}: {n_params / 1e6:.1f} M non-embedding "
          f"parameters; {args.env} {opts}, {args.tasks} tasks x {args.group}, max {args.turns} turns of "
          f"{args.max_new_tokens} tokens{' (to the first newline)' if args.stop_at_newline else ''}, {args.num_envs} envs, minibatch {args.minibatch} / grad_accum "
          f"{args.grad_accum}, {args.epochs} epoch(s), kl {args.kl}, history_turns {args.history_turns or 'all'}")
    print(f"{'it':>3} {'episodes':>8} {'turns':>6} {'prompt':>7} {'obs':>6} {'action':>6} {'padded':>7} | "
          + " ".join(f"{p + ' s':>9}" for p in PHASES) + f" {'total s':>8} | "
          + " ".join(f"{p + ' cpu':>9}" for p in PHASES) + " | "
          + " ".join(f"{p + ' GiB':>11}" for p in PHASES) + " | " + " ".join(f"{p + ' GF/s':>11}" for p in
                                                                            ("rollout", "score", "update")))
    for r in rows:
        flops = phase_flops(r, n_params, head, lora=not args.no_lora, epochs=args.epochs,
                            episodes=args.tasks * args.group)
        gfs = {p: flops[p] / max(r[f"{p}_time"], 1e-9) / 1e9 for p in flops}
        total = sum(r[f"{p}_time"] for p in PHASES)
        print(f"{r['step']:>3} {len(range(args.tasks * args.group)):>8} {r['steps']:>6.2f} {r['prompt_tokens']:>7} "
              f"{r['observation_tokens']:>6} {r['action_tokens']:>6} {r['padded_tokens']:>7} | "
              + " ".join(f"{r[p + '_time']:>9.1f}" for p in PHASES) + f" {total:>8.1f} | "
              + " ".join(f"{r.get(p + '_cpu_time', float('nan')):>9.1f}" for p in PHASES) + " | "
              + " ".join(f"{r[p + '_peak_rss_gib']:>11.2f}" for p in PHASES) + " | "
              + " ".join(f"{gfs[p]:>6.1f} ({gfs[p] * 1e9 / peak:>3.0%})" for p in gfs))
    print(f"process peak RSS {peak_rss_gib():.2f} GiB (since the last phase start)")
    if last_trajs:
        won = sum(t.success for t in last_trajs)
        valid = sum(s.valid for t in last_trajs for s in t.steps) / max(sum(t.num_steps for t in last_trajs), 1)
        print(f"last iteration's episodes: {won} of {len(last_trajs)} won, {valid:.0%} of the actions valid")
    for t in last_trajs[:args.show]:  # what the policy actually did, not only the timings
        print(f"  task {t.task} ({'won' if t.success else 'lost'}): "
              + " | ".join(f"{s.action.strip()!r}{'' if s.valid else ' (invalid)'}" for s in t.steps))
    last = rows[-1]
    ratio = (last["score_time"] + last["update_time"]) / max(last["rollout_time"], 1e-9)
    cpu = {p: last.get(p + "_cpu_time", float("nan")) for p in PHASES}
    cpu_ratio = (cpu["score"] + cpu["update"]) / max(cpu["rollout"], 1e-9)
    print(f"last iteration: {sum(last[p + '_time'] for p in PHASES):.1f} s wall, {sum(cpu.values()):.1f} s CPU; "
          f"(score + update) / rollout = {ratio:.2f} wall, {cpu_ratio:.2f} CPU; "
          f"max phase peak RSS {max(last[p + '_peak_rss_gib'] for p in PHASES):.2f} GiB")
    fe = forward_equivalents(last, lora=not args.no_lora)
    if fe is not None:
        print(f"update: {fe['update_passes']:.2f} forward passes per token (floor {fe['floor']:.0f}: forward + "
              f"{'input gradient' if not args.no_lora else 'input and weight gradients'}); at the floor, "
              f"(score + update) / rollout would be {fe['ratio_at_floor']:.2f}")


if __name__ == "__main__":
    main()
