"""The pipeline's stages. Each reads its inputs from the run dir and writes its outputs there:

    sft/model/               policy after behaviour cloning      (sft)
    sft/demos/               expert trajectories                 (sft)
    explore/trajectories/    K rollouts per train task           (explore)
    progress/estimator/      SPA progress estimator              (progress)
    rl/model/, rl/checkpoints/  policy after PPO/GRPO            (rl)
    dpo/model/               policy after DPO                    (dpo)
    eval/results.json        held-out metrics, SFT vs final      (eval)
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from accelerate.utils import set_seed

from rl.demos import expert_trajectories
from rl.eval import episode_metrics, evaluate
from rl.models import load_model, load_tokenizer, save_model
from rl.rollout import collect_rollouts
from rl.trajectory import load_trajectories, save_trajectories


def _require(path: Path, stage: str, producer: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"stage {stage!r} needs {path} (made by stage {producer!r}); run it first")
    return path


def _tokenizer(ctx):
    sft_dir = ctx.run_dir / "sft" / "model"
    return load_tokenizer(str(sft_dir) if sft_dir.exists() else (ctx.cfg.model.path or ctx.cfg.model.name))


def _start_dir(ctx) -> Path | None:
    """Where later stages start from: the SFT policy when that stage ran, else the recipe's model
    (envs without demonstrations, e.g. WebShop, skip sft)."""
    sft_dir = ctx.run_dir / "sft" / "model"
    return sft_dir if sft_dir.exists() else None


def _policy(ctx, path: Path | None, tokenizer, lora: bool):
    """Load a stage's policy checkpoint (None: the recipe's model), LoRA-wrapped when asked."""
    overrides = {"lora": lora} if path is None else {"path": str(path), "lora": lora}
    return load_model(seeded(replace(ctx.cfg.model, **overrides), ctx.cfg.seed), tokenizer)


def seeded(sub_cfg, run_seed: int):
    """A stage config whose `seed` is offset by the run's seed, so `seed=N` moves every stage."""
    return replace(sub_cfg, seed=run_seed + sub_cfg.seed)


def _log_fn(ctx, stage: str):
    return lambda metrics, step: ctx.log(metrics, stage=stage, step=step)


def run_sft(ctx) -> dict:
    cfg = ctx.cfg
    from rl.trainers.sft import train_sft

    set_seed(cfg.seed)
    env = ctx.env_factory()
    tasks = ctx.tasks[cfg.env.train_split]
    demos = expert_trajectories(env, tasks[: cfg.env.num_demo_tasks or len(tasks)])
    out = ctx.run_dir / "sft"
    if ctx.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_trajectories(demos, out / "demos")
    tokenizer = load_tokenizer(cfg.model.path or cfg.model.name)
    model = load_model(seeded(cfg.model, cfg.seed), tokenizer)
    model = train_sft(seeded(cfg.sft, cfg.seed), model, tokenizer, demos, out / "model", accelerator=ctx.accelerator,
                      log_fn=_log_fn(ctx, "sft"), history_turns=cfg.rollout.history_turns)
    return {}


def run_explore(ctx) -> dict:
    cfg = ctx.cfg
    set_seed(cfg.seed + 1)
    tokenizer = _tokenizer(ctx)
    model = _policy(ctx, _start_dir(ctx), tokenizer, lora=False)
    rollout_cfg = _with_temperature(cfg.rollout, cfg.explore.temperature)
    trajs = collect_rollouts(model, tokenizer, ctx.env_factory, ctx.tasks[cfg.env.train_split], rollout_cfg,
                             group_size=cfg.explore.rollouts_per_task, seed=cfg.seed + 1,
                             accelerator=ctx.accelerator, desc="explore")
    metrics = episode_metrics(trajs, prefix="explore/")
    ctx.log(metrics, stage="explore", step=0)
    if ctx.accelerator.is_main_process:
        save_trajectories(trajs, ctx.run_dir / "explore" / "trajectories")
    ctx.accelerator.print(f"[explore] {len(trajs)} trajectories, success {metrics['explore/success_rate']:.2f}")
    return {}


def _with_temperature(rollout_cfg, temperature: float):
    return replace(rollout_cfg, temperature=temperature)


def run_progress(ctx) -> dict:
    cfg = ctx.cfg
    from rl.credit import annotate_progress, fit_progress_estimator
    from rl.credit.plot import credit_heatmap, heatmap_credits

    set_seed(cfg.seed + 2)
    trajs = load_trajectories(_require(ctx.run_dir / "explore" / "trajectories", "progress", "explore"))
    tokenizer = _tokenizer(ctx)
    backbone = _policy(ctx, _start_dir(ctx), tokenizer, lora=False)
    last: dict = {}
    log_progress = _log_fn(ctx, "progress")

    def log_fn(metrics, step):
        last.update(metrics)
        log_progress(metrics, step)

    estimator = fit_progress_estimator(seeded(cfg.progress, cfg.seed), trajs, tokenizer, backbone, ctx.run_dir / "progress" / "estimator",
                                       accelerator=ctx.accelerator, log_fn=log_fn)
    faithful = "" if "progress/spearman_true" not in last else (
        f", vs true progress: Spearman {last['progress/spearman_true']:.2f}, "
        f"top step a progress event in {last['progress/top_step_hit']:.0%} of won trajectories")
    ctx.accelerator.print(f"[progress] best val loss {last['progress/best_val_loss']:.4f} (predicting the mean outcome: "
                          f"{last['progress/val_loss_constant']:.4f}), credit CV {last['progress/credit_cv']:.2f}"
                          f"{faithful} (read at {cfg.progress.read_at})")
    # one trajectory per task (rollouts of one task are often identical), won ones first
    by_task = {}
    for t in sorted(trajs, key=lambda t: -t.outcome):
        by_task.setdefault(t.task, t)
    sample = list(by_task.values())[:8]
    annotate_progress(estimator, tokenizer, sample, max_length=cfg.progress.max_length)
    if ctx.accelerator.is_main_process:
        credits = heatmap_credits(sample, cfg.credit)
        plots = ctx.run_dir / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        credit_heatmap(sorted(sample, key=lambda t: -t.outcome), {
            m: [c for _, c in sorted(zip(sample, v), key=lambda p: -p[0].outcome)] for m, v in credits.items()
        }, plots / "credit_heatmap.png")
    return {}


def _credit_fn(ctx, tokenizer):
    cfg = ctx.cfg
    from rl.credit import annotate_progress, load_estimator_for, step_rewards

    estimator = online = None
    if cfg.credit.mode == "spa":
        path = _require(ctx.run_dir / "progress" / "estimator", "rl", "progress")
        estimator = load_estimator_for(path, ctx.accelerator)
        if cfg.progress.refit_every:  # online SPA: refit on the RL stage's own recent rollouts
            from rl.credit.online import OnlineProgress

            online = OnlineProgress(estimator, tokenizer, seeded(cfg.progress, cfg.seed), ctx.accelerator,
                                    _log_fn(ctx, "progress_online"))
    scorer = None
    if cfg.credit.mode == "prm":
        from rl.credit import resolve_scorer

        scorer = resolve_scorer(cfg.credit.prm_scorer)

    def credit_fn(trajs):
        if online is not None:
            online(trajs)
        elif estimator is not None:
            annotate_progress(estimator, tokenizer, trajs, max_length=cfg.progress.max_length)
        return step_rewards(trajs, cfg.credit, scorer=scorer)

    return credit_fn


def _eval_fn(ctx, tokenizer):
    cfg = ctx.cfg
    tasks = ctx.tasks[cfg.env.dev_split or cfg.env.eval_split]

    def eval_fn(model):
        metrics, _ = evaluate(model, tokenizer, ctx.env_factory, tasks, cfg.rollout, seed=cfg.seed,
                              greedy=cfg.eval.greedy, accelerator=ctx.accelerator)
        return metrics

    return eval_fn


def run_rl(ctx) -> dict:
    cfg = ctx.cfg
    from rl.trainers.ppo import train_rl

    set_seed(cfg.seed + 3)
    tokenizer = _tokenizer(ctx)
    policy = _policy(ctx, _start_dir(ctx), tokenizer, lora=cfg.model.lora)
    rollout_cfg = cfg.rollout

    def rollout_fn(model, tasks, seed):
        return collect_rollouts(model, tokenizer, ctx.env_factory, tasks, rollout_cfg,
                                group_size=cfg.rl.group_size, seed=seed, accelerator=ctx.accelerator,
                                desc="rl rollout")

    policy = train_rl(seeded(cfg.rl, cfg.seed), policy, tokenizer, rollout_fn, _credit_fn(ctx, tokenizer), _eval_fn(ctx, tokenizer),
                      run_dir=ctx.run_dir / "rl", accelerator=ctx.accelerator, tracker=ctx.tracker,
                      resume=cfg.resume, tasks=ctx.tasks[cfg.env.train_split], temperature=rollout_cfg.temperature,
                      history_turns=rollout_cfg.history_turns)
    if ctx.accelerator.is_main_process:
        save_model(ctx.accelerator.unwrap_model(policy), tokenizer, ctx.run_dir / "rl" / "model")
    return {}


def run_dpo(ctx) -> dict:
    cfg = ctx.cfg
    from rl.trainers.dpo import train_dpo

    set_seed(cfg.seed + 4)
    trajs = load_trajectories(_require(ctx.run_dir / "explore" / "trajectories", "dpo", "explore"))
    tokenizer = _tokenizer(ctx)
    if cfg.dpo.pairs == "step":
        from rl.credit import annotate_progress, load_estimator_for

        estimator = load_estimator_for(_require(ctx.run_dir / "progress" / "estimator", "dpo", "progress"),
                                       ctx.accelerator)
        annotate_progress(estimator, tokenizer, trajs, max_length=cfg.progress.max_length)
    policy = _policy(ctx, _start_dir(ctx), tokenizer, lora=cfg.model.lora)
    train_dpo(seeded(cfg.dpo, cfg.seed), policy, tokenizer, trajs, ctx.run_dir / "dpo" / "model", log_fn=_log_fn(ctx, "dpo"))
    return {}


def final_policy_dir(run_dir: Path) -> Path | None:
    """The newest trained policy: rl, else dpo, else sft."""
    for stage in ("rl", "dpo", "sft"):
        if (run_dir / stage / "model").exists():
            return run_dir / stage / "model"
    return None


def run_eval(ctx) -> dict:
    cfg = ctx.cfg
    tokenizer = _tokenizer(ctx)
    final = final_policy_dir(ctx.run_dir)
    candidates = {}
    if cfg.eval.compare_with_sft and (ctx.run_dir / "sft" / "model").exists() and final != ctx.run_dir / "sft" / "model":
        candidates["sft"] = ctx.run_dir / "sft" / "model"
    candidates[final.parent.name if final else "base"] = final
    results: dict[str, dict] = {}
    for label, path in candidates.items():
        set_seed(cfg.seed)
        model = _policy(ctx, path, tokenizer, lora=False)
        metrics, trajs = evaluate(model, tokenizer, ctx.env_factory, ctx.tasks[cfg.env.eval_split], cfg.rollout,
                                  seed=cfg.seed, greedy=cfg.eval.greedy, accelerator=ctx.accelerator,
                                  desc=f"eval {label}")
        results[label] = metrics
        ctx.log({**metrics, "policy": label}, stage="eval", step=len(results) - 1)
        if ctx.accelerator.is_main_process:
            save_trajectories(trajs, ctx.run_dir / "eval" / f"trajectories_{label}")
    if ctx.accelerator.is_main_process:
        (ctx.run_dir / "eval").mkdir(parents=True, exist_ok=True)
        (ctx.run_dir / "eval" / "results.json").write_text(json.dumps(results, indent=2))
        print_comparison(results, cfg.env.eval_split)
    last = list(results.values())[-1]
    return last


def print_comparison(results: dict[str, dict], split: str) -> None:
    keys = ("eval/success_rate", "eval/mean_score", "eval/grounding_accuracy", "eval/mean_turns")
    print(f"\nHeld-out evaluation on split {split!r}")
    print(f"{'policy':<8}" + "".join(f"{k.split('/')[1]:>20}" for k in keys))
    for label, m in results.items():
        print(f"{label:<8}" + "".join(f"{m[k]:>20.3f}" for k in keys))
    if "sft" in results and len(results) > 1:
        final_label = list(results)[-1]
        delta = 100 * (results[final_label]["eval/success_rate"] - results["sft"]["eval/success_rate"])
        print(f"success rate {final_label} vs sft: {delta:+.1f} points")
