"""Per-episode cost against the horizon, whole history vs a history window, in one run.

    python benchmarks/horizon.py                                   # tiny model, 10/20/40 turns, k=4
    python benchmarks/horizon.py --model smollm2-135m --turns 10 20 --episodes 4

For each horizon H and each history setting (the whole history, `rollout.history_turns=k`), one
RL iteration of `train_rl` (GRPO, LoRA on a real model) on `LongWalk`, an env that lasts exactly
H turns (observations like keydoor's, every reply valid), and prints per episode: rollout,
score and update seconds (wall and CPU), the longest prompt, the tokens the update processes,
and peak RSS. With the window, prompt length and per-turn cost stay flat as H grows; with the
whole history they grow linearly (so the episode's cost grows quadratically in attention and
linearly in tokens per turn).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.models import ModelConfig, load_model, load_tokenizer  # noqa: E402
from rl.rollout import RolloutConfig, collect_rollouts  # noqa: E402

PHASES = ("rollout", "score", "update")


class LongWalk:
    """Walk for exactly `turns` turns; the observation names a random room and exits."""

    system_prompt = ("You are an agent in a maze of rooms. Reply with exactly one action per turn: "
                     "go north, go south, go east, go west.")

    def __init__(self, turns: int):
        self.turns, self.t, self.rng = turns, 0, None

    def tasks(self, split):
        return [f"{split}-{i}" for i in range(64)]

    def reset(self, task):
        import random

        self.t, self.rng = 0, random.Random(task)
        return self._obs(), {"valid": True, "won": False, "score": 0.0}

    def _obs(self):
        return (f"You are in room {self.rng.randint(1, 99)}. Exits lead "
                f"{' and '.join(self.rng.sample(['north', 'south', 'east', 'west'], 2))}.")

    def parse_action(self, reply):
        return reply.strip() or "wait"

    def step(self, action):
        self.t += 1
        done = self.t >= self.turns
        return self._obs(), 0.0, done, {"valid": True, "won": done, "score": float(done)}


def one(args, model_name, turns, history, tok):
    from accelerate import Accelerator

    from rl.tracking import Tracker, read_metrics
    from rl.trainers.ppo import PPOConfig, train_rl

    policy = load_model(ModelConfig(name=model_name, lora=True), tok)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    rcfg = RolloutConfig(max_turns=turns, max_new_tokens=args.max_new_tokens, num_envs=args.episodes,
                         history_turns=history, max_prompt_tokens=100_000)
    prompts = []

    def rollout_fn(model, tasks, seed):
        trajs = collect_rollouts(model, tok, lambda: LongWalk(turns), tasks, rcfg, group_size=args.group, seed=seed)
        from rl.trajectory import encode_conversation, windowed_context

        for t in trajs:  # the longest prompt the policy was given
            obs, acts = [s.observation for s in t.steps], [s.action for s in t.steps]
            prompts.append(len(encode_conversation(tok, t.system_prompt, *windowed_context(
                obs, acts, t.num_steps - 1, history), True).input_ids))
        return trajs

    n = args.episodes
    cfg = PPOConfig(algo="grpo", iterations=1, tasks_per_iter=n // args.group, group_size=args.group, ppo_epochs=1,
                    minibatch_size=n, grad_accum_steps=n, lr=1e-4, kl_coef=0.05, eval_every=0,
                    eval_at_start=False, save_every=10**9, max_length=100_000)
    rewards = lambda ts: [[0.0] * (t.num_steps - 1) + [float(t.outcome)] for t in ts]  # noqa: E731
    with tempfile.TemporaryDirectory() as run_dir:
        tracker = Tracker(run_dir, acc)
        train_rl(cfg, policy, tok, rollout_fn, rewards, None, run_dir, acc, tracker,
                 tasks=LongWalk(turns).tasks("train"), history_turns=history)
        tracker.close()
        row = read_metrics(run_dir, "rl")[0]
    row["max_prompt"] = max(prompts)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--turns", type=int, nargs="+", default=[10, 20, 40])
    ap.add_argument("--history", type=int, default=4, help="rollout.history_turns of the windowed runs")
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--group", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--from-output", metavar="FILE",
                    help="print the summary line of a saved run's output (its table) instead of running")
    args = ap.parse_args(argv)
    if args.from_output:
        path = Path(args.from_output)
        if not path.is_file():
            ap.error(f"--from-output {path}: no such file (give a saved horizon.py output)")
        table = parse_table(path.read_text())
        if not table:
            ap.error(f"--from-output {path}: no table rows in it (is it horizon.py's output?)")
        print(summary(table))
        return
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    print(f"{args.model} + LoRA, {args.episodes} episodes of H turns, {args.max_new_tokens} new tokens per reply; "
          f"per episode:")
    print(f"{'H':>4} {'history':>8} {'max prompt':>10} {'trained tok':>11} | "
          + " ".join(f"{p + ' s':>9}" for p in PHASES) + " | " + " ".join(f"{p + ' cpu':>11}" for p in PHASES)
          + f" | {'peak GiB':>8}")
    lines = []
    for turns in args.turns:
        for history in (0, args.history):
            r = one(args, args.model, turns, history, tok)
            n = args.episodes
            tokens = r["prompt_tokens"] + r["observation_tokens"] + r["action_tokens"]
            lines.append(f"{turns:>4} {history or 'all':>8} {r['max_prompt']:>10} {tokens / n:>11.0f} | "
                         + " ".join(f"{r[p + '_time'] / n:>9.2f}" for p in PHASES) + " | "
                         + " ".join(f"{r[p + '_cpu_time'] / n:>11.2f}" for p in PHASES)
                         + f" | {max(r[p + '_peak_rss_gib'] for p in PHASES):>8.2f}")
            print(lines[-1], flush=True)
    print(summary(parse_table("\n".join(lines))))


def parse_table(text: str) -> dict[str, dict[int, float]]:
    """The printed rows -> {history: {H: CPU seconds per episode (rollout + score + update)}}."""
    out: dict[str, dict[int, float]] = {}
    for line in text.splitlines():
        parts = line.split("|")
        head = parts[0].split()
        if len(parts) != 4 or len(head) != 4 or not head[0].isdigit():
            continue
        out.setdefault(head[1], {})[int(head[0])] = sum(float(x) for x in parts[2].split())
    return out


def summary(table: dict[str, dict[int, float]]) -> str:
    """Longest vs shortest horizon's CPU cost per episode, per history setting (the issue's goal:
    <= 4.5x from 10 to 40 turns with the window)."""
    if not table:
        raise ValueError("no table rows found")
    lo, hi = min(min(c) for c in table.values()), max(max(c) for c in table.values())
    parts = [f"{'whole history' if h == 'all' else f'history_turns {h}'} {cost[hi] / cost[lo]:.2f}x"
             for h, cost in table.items() if lo in cost and hi in cost]
    return f"CPU cost per episode, {hi} vs {lo} turns: " + ", ".join(parts)


if __name__ == "__main__":
    main()
