"""Rollout throughput: the batched lockstep engine vs a naive one-env-at-a-time loop.

Same model, same env (keydoor), same sampling settings, same machine, one run. Prints env steps/s
and generated tokens/s for:
  batched+cache   collect_rollouts, --num-envs envs in lockstep, KV cache reused across turns
                  (each turn's new prompt tokens encoded in length buckets on a CPU)
  padded          the same with the new tokens in one batch left-padded to the longest
                  (`rollout.bucket_prefill=off`)
  batched         collect_rollouts, --num-envs envs in lockstep, fresh prefill every turn
  naive           one env at a time, batch 1, the whole conversation re-encoded every turn
and the ratios to the naive loop. With `--lora R` the model carries a LoRA adapter of rank R (its B
initialised away from 0, as after training) and one more row runs batched+cache with the adapter
left unmerged (`rollout.merge_lora=false`); the last line is the merged-vs-unmerged ratio.

    python benchmarks/rollout_throughput.py --model tiny --episodes 16 --max-new-tokens 16
    python benchmarks/rollout_throughput.py --model smollm2-135m --lora 16 --episodes 16 --max-turns 4
    python benchmarks/rollout_throughput.py --env textworld --model runs/textworld_cpu/sft/model --greedy --episodes 30 --num-envs 16 --max-turns 8 --rows batched+cache,padded

`--env textworld` plays the dev games of `recipes/textworld_cpu.yaml`'s settings (generated on first
use) with its reply budget and stop string; `--model` also takes a policy dir written by a stage.
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
    p.add_argument("--model", default="tiny", help="tiny, smollm2-135m or a policy dir")
    p.add_argument("--env", default="keydoor", choices=["keydoor", "textworld"])
    p.add_argument("--greedy", action="store_true", help="argmax replies (the evaluations' setting)")
    p.add_argument("--rows", default="all", help="comma-separated rows to run (default all): "
                   "batched+cache, padded, unmerged (with --lora), batched, naive")
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
    base = dict(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens, temperature=1.0)
    if args.env == "keydoor":
        env_factory = lambda: make_env("keydoor", size=3, num_train_tasks=max(args.episodes, 8))  # noqa: E731
        tasks = [f"train-{i}" for i in range(args.episodes)]
    else:  # recipes/textworld_cpu.yaml's games and reply settings
        opts = dict(num_train_games=60, num_dev_games=30, num_test_games=50, quest_length=3, world_size=4,
                    nb_objects=4, max_steps=8)
        env_factory = lambda: make_env("textworld", **opts)  # noqa: E731
        tasks = env_factory().tasks("dev")[:args.episodes]
        base.update(max_new_tokens=12, stop_strings=["\n"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model={args.model} ({n_params / 1e6:.2f}M params) device={model.device} "
          f"threads={torch.get_num_threads()} episodes={args.episodes} max_turns={args.max_turns} "
          f"max_new_tokens={base['max_new_tokens']} num_envs={args.num_envs} env={args.env}")

    # warm-up: first-call costs (kernels, allocator) must not land on one contender
    collect_rollouts(model, tokenizer, env_factory, tasks[:2], RolloutConfig(**{**base, "max_turns": 1}, num_envs=2))

    rows = []
    modes = [("batched+cache", True, True, "auto"), ("padded", True, True, "off"), ("batched", False, True, "auto")]
    if args.lora:
        modes.insert(1, ("unmerged", True, False, "auto"))
    wanted = None if args.rows == "all" else set(args.rows.split(","))
    modes = [m for m in modes if wanted is None or m[0] in wanted]
    actions, extra = {}, {}
    for name, reuse, merge, bucket in modes:
        cfg = RolloutConfig(**base, num_envs=args.num_envs, reuse_cache=reuse, merge_lora=merge, bucket_prefill=bucket)
        fed = []  # positions each forward computes: prompt tokens and padding, then 1 per row per decode step
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # generate's forwards skip peft's
        hook = inner.register_forward_pre_hook(
            lambda mod, a, kw: fed.append((kw.get("input_ids") if kw.get("input_ids") is not None else a[0]).numel()),
            with_kwargs=True)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            trajs = collect_rollouts(model, tokenizer, env_factory, tasks, cfg, seed=args.seed, greedy=args.greedy,
                                     desc=name)
        finally:
            hook.remove()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        s = rollout_summary(trajs)
        rows.append((name, s["turns"], s["gen_tokens"], wall))
        extra[name] = (cpu, sum(fed))
        actions[name] = [[st.action for st in t.steps] for t in trajs]
    if wanted is None or "naive" in wanted:
        cfg = RolloutConfig(**base, num_envs=1)
        t0 = time.perf_counter()
        steps, tokens = naive_rollouts(model, tokenizer, env_factory, tasks, cfg, args.seed)
        rows.append(("naive", steps, tokens, time.perf_counter() - t0))

    ref = rows[-1]  # the last row run (naive, by default) is the baseline of the ratio columns
    naive_steps_s = ref[1] / ref[3]
    naive_tok_s = ref[2] / ref[3]
    vs = ref[0]
    print(f"{'mode':<14} {'steps':>6} {'tokens':>7} {'wall_s':>7} {'steps/s':>8} {'tok/s':>8} "
          f"{'steps/s vs ' + vs:>17} {'tok/s vs ' + vs:>15}")
    for name, steps, tokens, wall in rows:
        print(f"{name:<14} {steps:>6.0f} {tokens:>7.0f} {wall:>7.2f} {steps / wall:>8.1f} {tokens / wall:>8.1f} "
              f"{steps / wall / naive_steps_s:>16.2f}x {tokens / wall / naive_tok_s:>14.2f}x")
    print(f"{'mode':<14} {'cpu_s':>7} {'positions':>10}   (forward positions computed; CPU seconds of this process)")
    for name, (cpu, positions) in extra.items():
        print(f"{name:<14} {cpu:>7.1f} {positions:>10d}")
    by_name = {r[0]: r for r in rows}

    def ratio(a: str, b: str) -> str:
        (_, s1, k1, w1), (_, s2, k2, w2) = by_name[a], by_name[b]
        return f"{s1 / w1 / (s2 / w2):.2f}x steps/s, {k1 / w1 / (k2 / w2):.2f}x tok/s"

    if {"batched+cache", "padded"} <= set(actions):
        same = "same replies" if actions["batched+cache"] == actions["padded"] else "replies differ"
        (cb, pb), (cp, pp) = extra["batched+cache"], extra["padded"]
        print(f"bucketed vs padded prefill (batched+cache): {ratio('batched+cache', 'padded')}, "
              f"{cp / cb:.2f}x CPU, {pb / pp:.2f}x the positions ({same})")
    if "unmerged" in by_name:
        print(f"LoRA merged vs unmerged (batched+cache): {ratio('batched+cache', 'unmerged')}")


if __name__ == "__main__":
    main()
