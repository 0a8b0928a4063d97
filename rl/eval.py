"""Evaluate a policy on an env split: success rate, score, grounding accuracy, turns.

    python -m rl.eval RECIPE --checkpoint runs/quickstart/rl/model [--split test] [key=value ...]

The recipe supplies the env, rollout settings and eval options; `--checkpoint` any policy dir
written by a stage (full model or LoRA adapter) or a model name.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from rl.trajectory import Trajectory


def episode_metrics(trajs: Sequence[Trajectory], prefix: str = "eval/") -> dict[str, float]:
    """Aggregate metrics over finished episodes; failed episodes count as lost."""
    n = max(len(trajs), 1)
    steps = sum(t.num_steps for t in trajs)
    valid = sum(s.valid for t in trajs for s in t.steps)
    return {
        f"{prefix}success_rate": sum(bool(t.success) for t in trajs) / n,
        f"{prefix}mean_score": sum(float(t.outcome) for t in trajs) / n,
        f"{prefix}grounding_accuracy": valid / max(steps, 1),
        f"{prefix}mean_turns": steps / n,
        f"{prefix}failed_episodes": float(sum(t.failed is not None for t in trajs)),
        f"{prefix}episodes": float(len(trajs)),
    }


def evaluate(model, tokenizer, env_factory: Callable, tasks: list[str], rollout_cfg, *, seed: int = 0,
             greedy: bool = True, accelerator=None, desc: str = "eval") -> tuple[dict[str, float], list[Trajectory]]:
    """Roll the policy out once per task (greedy by default) and aggregate `episode_metrics`."""
    from rl.rollout import collect_rollouts

    was_training = model.training
    model.eval()
    trajs = collect_rollouts(model, tokenizer, env_factory, tasks, rollout_cfg, group_size=1, seed=seed,
                             greedy=greedy, accelerator=accelerator, desc=desc)
    if was_training:
        model.train()
    return episode_metrics(trajs), trajs


def main(argv: list[str] | None = None) -> int:
    from dataclasses import replace

    from envs import EnvError
    from rl.config import ConfigError, load_config
    from rl.models import load_model, load_tokenizer
    from rl.train import RunConfig, build_context, evaluation_tasks

    parser = argparse.ArgumentParser(prog="python -m rl.eval", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--checkpoint", required=True, help="policy dir or model name")
    parser.add_argument("--split", default=None, help="env split (default: the recipe's env.eval_split)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value recipe overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(RunConfig, args.recipe, args.overrides)
        if args.split:
            cfg.env.eval_split = args.split
        ctx = build_context(cfg, with_trackers=False)
        tokenizer = load_tokenizer(args.checkpoint)
        model = load_model(replace(cfg.model, path=args.checkpoint, lora=False), tokenizer)
    except (ConfigError, EnvError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics, _ = evaluate(model, tokenizer, ctx.env_factory, evaluation_tasks(cfg, ctx), cfg.rollout,
                          seed=cfg.seed, greedy=cfg.eval.greedy, accelerator=ctx.accelerator)
    if ctx.accelerator.is_main_process:
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
