"""One GRPO iteration, ours vs TRL's GRPOTrainer: same model, LoRA, env, tasks, group, turns and sampling.

    python benchmarks/vs_trl.py                       # SmolLM2-135M + LoRA, keydoor, 8 tasks x 4
    python benchmarks/vs_trl.py --model tiny          # a quick check of the harness

TRL drives the multi-turn env through `rollout_func` the way a TRL user on a CPU would write it:
each turn one batched `model.generate` over every active conversation, its whole chat-template
history re-encoded (TRL has no KV cache that outlives a `generate` call; its fast path, vLLM,
needs a GPU); here that loop is `rl.rollout.collect_rollouts` with `reuse_cache=False`, so both
sides parse replies and step envs with the same code. Each episode's first prompt is TRL's
prompt, the rest of the conversation its completion, with `env_mask` = our action mask so
observation tokens get no loss. Ours rolls out with the KV cache kept across turns (the default).
After the rollout each side computes reference log-probs (beta = kl_coef), old log-probs where
needed, and the update (4 micro-batches of 8 episodes, one optimizer step, one epoch). Wall and
CPU seconds of the whole iteration and of its rollout are measured around each side (CPU seconds
are this process's, all threads: on a shared machine they track the work done); the last line
is the ratio TRL / ours of the iteration's CPU seconds. `--trl-reuse-cache` gives TRL our
engine's KV reuse too, so that only the work after the rollout differs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs import make_env  # noqa: E402
from rl.models import ModelConfig, load_model, load_tokenizer  # noqa: E402
from rl.phases import peak_rss_gib, reset_peak_rss  # noqa: E402
from rl.rollout import RolloutConfig, collect_rollouts  # noqa: E402
from rl.trajectory import tokenize_trajectory  # noqa: E402


class Clock:
    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self.w0
        self.cpu += time.process_time() - self.c0


def ours(args, tok, factory, tasks, rcfg):
    from accelerate import Accelerator

    from rl.tracking import Tracker
    from rl.trainers.ppo import PPOConfig, train_rl

    policy = load_model(ModelConfig(name=args.model, lora=True), tok)
    roll = Clock()

    def rollout_fn(model, batch_tasks, seed):
        with roll:
            return collect_rollouts(model, tok, factory, batch_tasks, rcfg, group_size=args.group, seed=seed)

    n = args.tasks * args.group
    cfg = PPOConfig(algo="grpo", iterations=1, tasks_per_iter=args.tasks, group_size=args.group, ppo_epochs=1,
                    minibatch_size=n, grad_accum_steps=4, lr=1e-5, kl_coef=args.kl, eval_every=0,
                    eval_at_start=False, save_every=10**9)
    rewards = lambda ts: [[0.0] * (t.num_steps - 1) + [float(t.outcome)] for t in ts]  # noqa: E731
    reset_peak_rss()
    with tempfile.TemporaryDirectory() as run_dir, Clock() as total:
        acc = Accelerator(cpu=True)
        tracker = Tracker(run_dir, acc)
        train_rl(cfg, policy, tok, rollout_fn, rewards, None, run_dir, acc, tracker, tasks=tasks,
                 temperature=rcfg.temperature)
        tracker.close()
    return total, roll, peak_rss_gib()


def trl(args, tok, factory, tasks, rcfg):
    from dataclasses import replace

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rl.trainers.ppo import draw_tasks

    policy = load_model(ModelConfig(name=args.model, lora=True), tok)
    roll = Clock()
    rcfg = replace(rcfg, reuse_cache=args.trl_reuse_cache)

    def rollout_func(prompts, trainer):
        with roll:
            trajs = collect_rollouts(trainer.model, tok, factory, list(prompts), rcfg, group_size=1, seed=args.seed)
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "env_mask": [], "outcome": []}
        for t in trajs:
            view = tokenize_trajectory(tok, t)
            first = view.action_mask.index(1) if 1 in view.action_mask else len(view.input_ids)
            out["prompt_ids"].append(view.input_ids[:first])
            out["completion_ids"].append(view.input_ids[first:])
            out["env_mask"].append(view.action_mask[first:])
            out["outcome"].append(float(t.outcome))
        return out

    def outcome_reward(prompts, completions, outcome, **kw):
        return outcome

    n = args.tasks * args.group
    batch_tasks = draw_tasks(tasks, args.tasks, args.seed, 0)
    data = Dataset.from_list([{"prompt": t} for t in batch_tasks])
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = GRPOConfig(output_dir=out_dir, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                         max_steps=1, num_generations=args.group, per_device_train_batch_size=n // 4,
                         gradient_accumulation_steps=4, beta=args.kl, learning_rate=1e-5, logging_steps=1,
                         temperature=rcfg.temperature, max_completion_length=4096, seed=args.seed,
                         shuffle_dataset=False, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=policy, reward_funcs=outcome_reward, args=cfg, train_dataset=data,
                              processing_class=tok, rollout_func=rollout_func)
        reset_peak_rss()
        with Clock() as total:
            trainer.train()
    return total, roll, peak_rss_gib()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--kl", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-reuse-cache", action="store_true",
                    help="TRL's rollout_func keeps the KV cache across turns like ours (default: re-encode each turn)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    factory = lambda: make_env("keydoor", size=3)  # noqa: E731
    tasks = factory().tasks("train")
    rcfg = RolloutConfig(max_turns=args.turns, max_new_tokens=args.max_new_tokens, num_envs=args.tasks * args.group,
                         temperature=1.0)
    rows = {}
    for name, fn in (("ours", ours), ("trl", trl)):
        total, roll, peak = fn(args, tok, factory, tasks, rcfg)
        rows[name] = (total, roll, peak)
        print(f"{name:<5} iteration {total.wall:7.1f} s wall {total.cpu:7.1f} s CPU | rollout {roll.wall:6.1f} s wall "
              f"{roll.cpu:6.1f} s CPU | after rollout {total.wall - roll.wall:6.1f} s wall "
              f"{total.cpu - roll.cpu:6.1f} s CPU | peak RSS {peak:.2f} GiB", flush=True)
    (t_o, r_o, p_o), (t_t, r_t, p_t) = rows["ours"], rows["trl"]
    print(f"TRL / ours: rollout CPU {r_t.cpu / max(r_o.cpu, 1e-9):.2f}x, after-rollout CPU "
          f"{(t_t.cpu - r_t.cpu) / max(t_o.cpu - r_o.cpu, 1e-9):.2f}x, peak RSS {p_t / max(p_o, 1e-9):.2f}x")
    print(f"ours vs TRL: {t_t.cpu / max(t_o.cpu, 1e-9):.2f}x faster per iteration (CPU seconds; "
          f"wall {t_t.wall / max(t_o.wall, 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
