"""Rollout throughput: the batched lockstep engine vs a naive one-env-at-a-time loop.

Same model, same env (keydoor), same sampling settings, same machine, one run. Prints env steps/s
and generated tokens/s for:
  batched+cache   collect_rollouts, --num-envs envs in lockstep, KV cache reused across turns
  batched         collect_rollouts, --num-envs envs in lockstep, fresh prefill every turn
  naive           one env at a time, batch 1, the whole conversation re-encoded every turn
and the ratios to the naive loop. With `--lora R` the model carries a LoRA adapter of rank R (its B
initialised away from 0, as after training) and one more row runs batched+cache with the adapter
left unmerged (`rollout.merge_lora=false`); the last line is the merged-vs-unmerged ratio.

    python benchmarks/rollout_throughput.py --model tiny --episodes 16 --max-new-tokens 16
    python benchmarks/rollout_throughput.py --model smollm2-135m --lora 16 --episodes 16 --max-turns 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from envs import make_env  # noqa: E402
from rl.models import ModelConfig, load_model, load_tokenizer  # noqa: E402
from rl.rollout import RolloutConfig, collect_rollouts, rollout_summary  # noqa: E402
from rl.trajectory import encode_conversation  # noqa: E402


def naive_rollouts(model, tokenizer, env_factory, tasks, cfg: RolloutConfig, seed: int) -> tuple[int, int]:
    """The loop one writes first: one env, batch 1, the full prompt encoded and prefilled each
    turn. Returns (env steps, generated tokens)."""
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                               top_p=cfg.top_p, top_k=cfg.top_k, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    steps = tokens = 0
    env = env_factory()
    for task in tasks:
        obs, _ = env.reset(task)
        observations, actions = [obs], []
        for _ in range(cfg.max_turns):
            ids = encode_conversation(tokenizer, env.system_prompt, observations, actions, True).input_ids
            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor([ids]), generation_config=gen_cfg)
            gen = out[0, len(ids):].tolist()
            tokens += len(gen)
            reply = tokenizer.decode(gen, skip_special_tokens=True).strip()
            action = env.parse_action(reply)
            steps += 1
            actions.append(reply)
            if action is None:
                observations.append("Your reply is not a valid action. " + observations[-1])
                continue
            obs, _, done, _ = env.step(action)
            observations.append(obs)
            if done:
                break
    return steps, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2-135m"])
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-turns", type=int, default=6)
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on the model (0: none); adds the unmerged row")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.model)
    model = load_model(ModelConfig(name=args.model, lora=args.lora > 0, lora_r=max(args.lora, 1),
                                   lora_alpha=2 * max(args.lora, 1)), tokenizer).eval()
    if args.lora:
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():  # B = 0 (peft's init) would make the adapter a no-op
            for name, prm in model.named_parameters():
                if "lora_B" in name:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.01)
    if torch.cuda.is_available():
        model.to("cuda")
    env_factory = lambda: make_env("keydoor", size=3, num_train_tasks=max(args.episodes, 8))  # noqa: E731
    tasks = [f"train-{i}" for i in range(args.episodes)]
    base = dict(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens, temperature=1.0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model={args.model} ({n_params / 1e6:.2f}M params) device={model.device} "
          f"threads={torch.get_num_threads()} episodes={args.episodes} max_turns={args.max_turns} "
          f"max_new_tokens={args.max_new_tokens} num_envs={args.num_envs}")

    # warm-up: first-call costs (kernels, allocator) must not land on one contender
    collect_rollouts(model, tokenizer, env_factory, tasks[:2], RolloutConfig(**{**base, "max_turns": 1}, num_envs=2))

    rows = []
    modes = [("batched+cache", True, True), ("batched", False, True)]
    if args.lora:
        modes.insert(1, ("cache,unmerged", True, False))
    for name, reuse, merge in modes:
        cfg = RolloutConfig(**base, num_envs=args.num_envs, reuse_cache=reuse, merge_lora=merge)
        t0 = time.perf_counter()
        trajs = collect_rollouts(model, tokenizer, env_factory, tasks, cfg, seed=args.seed, desc=name)
        wall = time.perf_counter() - t0
        s = rollout_summary(trajs)
        rows.append((name, s["turns"], s["gen_tokens"], wall))
    cfg = RolloutConfig(**base, num_envs=1)
    t0 = time.perf_counter()
    steps, tokens = naive_rollouts(model, tokenizer, env_factory, tasks, cfg, args.seed)
    rows.append(("naive", steps, tokens, time.perf_counter() - t0))

    naive_steps_s = rows[-1][1] / rows[-1][3]
    naive_tok_s = rows[-1][2] / rows[-1][3]
    print(f"{'mode':<14} {'steps':>6} {'tokens':>7} {'wall_s':>7} {'steps/s':>8} {'tok/s':>8} "
          f"{'steps/s vs naive':>17} {'tok/s vs naive':>15}")
    for name, steps, tokens, wall in rows:
        print(f"{name:<14} {steps:>6.0f} {tokens:>7.0f} {wall:>7.2f} {steps / wall:>8.1f} {tokens / wall:>8.1f} "
              f"{steps / wall / naive_steps_s:>16.2f}x {tokens / wall / naive_tok_s:>14.2f}x")
    if args.lora:
        (_, s1, k1, w1), (_, s2, k2, w2) = rows[0], rows[1]
        print(f"LoRA merged vs unmerged (batched+cache): {s1 / w1 / (s2 / w2):.2f}x steps/s, "
              f"{k1 / w1 / (k2 / w2):.2f}x tok/s")


if __name__ == "__main__":
    main()
