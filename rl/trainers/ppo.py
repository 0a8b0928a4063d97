"""Multi-turn PPO, GRPO and RLOO for language agents: one visible loop over `rl.algos`.

Each iteration:
  1. draw `tasks_per_iter` train tasks from (seed, iteration) and roll each out `group_size`
     times with the current policy (`rollout_fn`, bound by the pipeline to an env + RolloutConfig);
  2. tokenize every trajectory as ONE chat sequence (`rl.trajectory.tokenize_trajectory`), the
     policy's tokens marked by `action_mask`, step k ending at `step_ends[k]` (with a rollout
     history window: one sequence per window block, each action in the context it was sampled in);
  3. per-step rewards from `credit_fn` (terminal, SPA progress, ...), placed at `step_ends`;
  4. old log-probs, values (critic) and reference log-probs, computed once in length-sorted
     micro-batches, sharded over processes and gathered, so every process holds the same batch.
     Log-probs are taken at action tokens only, the LM head run on those hidden states in chunks
     (no (B, T, V) logits). Without critic and dropout, the first minibatch of epoch 0 is not
     scored here: the update's forward runs on the sampling weights, so old = new.detach();
  5. advantages by name from `algos.ADVANTAGE_ESTIMATORS` (GAE over action tokens, GAE over turns,
     group-normalised or leave-one-out returns);
  6. `ppo_epochs` passes of shuffled minibatches (each process takes its slice, split into
     `grad_accum_steps` micro-batches), clipped surrogate + clipped value loss - entropy bonus
     + KL to the reference, then clip the gradient norm and step;
  7. log, evaluate every `eval_every`, checkpoint every `save_every` (and at the end); with
     `keep_best` the best-evaluated policy (the initial one included) is what is returned.

Departures from the papers (PPO: Schulman et al. 2017; GRPO: Shao et al. 2024; RLOO: Ahmadian
et al. 2024):
- one trajectory = one sequence: observation tokens are in the context but get no loss, no
  advantage and no discount (GAE skips them, as verl's multi-turn GAE);
- the KL to the reference is a loss term (GRPO-style, k1 or k3 per token, k3 capped at 10 per
  token as in verl) for every algorithm, not a per-token reward penalty;
- losses are a token mean over the whole minibatch (across micro-batches and processes), not a
  per-sequence mean, so long trajectories weigh by their length;
- a trajectory cut by `max_length` keeps its whole steps only; the rewards of the dropped steps
  are added to the last kept step (the return is unchanged when gamma = 1);
- the learning rate is constant; advantages are whitened only for the critic-based estimators
  (GRPO/RLOO are already normalised per group).
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from rl import algos
from rl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rl.eval import episode_metrics
from rl.models import adapter_is_identity
from rl.phases import peak_rss_gib, phase, release_memory, reset_peak_rss
from rl.trainers.scoring import (Batch, PolicyWithValue, advantages, build_batch, count_decoder_tokens,  # noqa: F401
                                 group_major_order, group_permutation, lm_logprobs, token_counts, token_pieces)
from rl.trainers.scoring import has_dropout as _has_dropout
from rl.trainers.scoring import score as _score

log = logging.getLogger(__name__)

RolloutFn = Callable[[nn.Module, list, int], list]  # (model, tasks, seed) -> list[Trajectory]
CreditFn = Callable[[list], list]  # trajectories -> per-step rewards, one list per trajectory
EvalFn = Callable[[nn.Module], dict]  # policy -> {"eval/success_rate": ..., ...} (rl.eval.evaluate's metrics)

_ESTIMATOR = {  # (algo, advantage_level) -> name in algos.ADVANTAGE_ESTIMATORS
    ("ppo", "token"): "gae", ("ppo", "turn"): "gae_turn",
    ("grpo", "token"): "grpo", ("grpo", "turn"): "grpo_step",
    ("rloo", "token"): "rloo", ("rloo", "turn"): "rloo",
    ("gigpo", "token"): "given", ("gigpo", "turn"): "given",  # credit.mode=gigpo gives advantages
}


@dataclass
class PPOConfig:
    algo: str = "ppo"  # "ppo" (critic + GAE) | "grpo" (group-normalised) | "rloo" (leave-one-out)
    #                    | "gigpo" (per-step advantages from credit.mode=gigpo, used as they are)
    iterations: int = 10  # rollout+update iterations
    tasks_per_iter: int = 8  # distinct train tasks per iteration
    group_size: int = 4  # rollouts per task (GRPO/RLOO groups; PPO just gets more data)
    ppo_epochs: int = 2  # passes over each iteration's batch
    minibatch_size: int = 8  # trajectories per optimizer step, over all processes
    grad_accum_steps: int = 1  # micro-batches per optimizer step on each process
    lr: float = 1e-5  # AdamW learning rate (constant)
    weight_decay: float = 0.0  # AdamW weight decay
    clip_eps: float = 0.2  # PPO ratio clip
    vf_clip: float = 0.2  # value clip around the old value (<= 0: no clipping)
    vf_coef: float = 0.5  # weight of the value loss
    ent_coef: float = 0.0  # weight of the entropy bonus
    kl_coef: float = 0.0  # weight of the KL-to-reference loss (0: no reference pass at all)
    kl_estimator: str = "k3"  # "k1" | "k3"
    gamma: float = 1.0  # discount, per action token ("token") or per turn ("turn")
    lam: float = 0.95  # GAE lambda
    advantage_level: str = "token"  # "token": GAE over action tokens; "turn": one advantage per step
    whiten_advantages: bool = True  # normalise GAE advantages over the batch's action tokens
    critic: str = "shared"  # "shared": value head on the policy's last hidden state; "separate": own backbone
    max_length: int = 2048  # tokens per trajectory sequence (whole steps past it are dropped)
    # padded tokens per forward (rows x their longest length; 0: the whole micro-batch): the update's
    # and the scoring's micro-batches are cut into pieces of at most this size (one row at least),
    # so activation memory is set by it, not by the longest episode; same gradient, same log-probs
    micro_batch_tokens: int = 0
    max_grad_norm: float = 1.0  # gradient norm clip
    eval_every: int = 5  # evaluate every N iterations (0: only at the end)
    eval_at_start: bool = True  # evaluate the initial policy before training (not on resume)
    # return the evaluated policy with the best success (the initial one included) instead of the
    # last; the pipeline evaluates on env.dev_split during RL, so the choice never sees the test split
    keep_best: bool = False
    save_every: int = 5  # checkpoint every N iterations (and always at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    seed: int = 0  # fixes task order, sampling seeds and minibatch order per iteration

    def __post_init__(self):
        allowed = {"algo": ("ppo", "grpo", "rloo", "gigpo"), "advantage_level": ("token", "turn"),
                   "critic": ("shared", "separate"), "kl_estimator": tuple(algos.KL_ESTIMATORS)}
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ValueError(f"rl.{key}={getattr(self, key)!r}: allowed {list(values)}")
        for key in ("iterations", "tasks_per_iter", "group_size", "ppo_epochs", "minibatch_size", "grad_accum_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"rl.{key}={getattr(self, key)}: must be >= 1")
        if self.keep_best and self.eval_every < 1:
            raise ValueError(f"rl.keep_best=true needs evaluations during training: rl.eval_every={self.eval_every}")

    @property
    def estimator(self) -> str:
        return _ESTIMATOR[(self.algo, self.advantage_level)]

    @property
    def uses_critic(self) -> bool:
        return self.estimator not in algos.CRITIC_FREE


def draw_tasks(train_tasks: Sequence[str], n: int, seed: int, iteration: int) -> list[str]:
    """The iteration's tasks: a function of (seed, iteration) only, so a resumed run sees the
    same data order. Without replacement when there are enough tasks."""
    rng = random.Random(f"{seed}-{iteration}")
    pool = list(train_tasks)
    return rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]


def _iter_seed(seed: int, iteration: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + iteration * 7919 + salt) % (2**31 - 1)


class BestPolicy:
    """The best evaluated policy so far (rl.keep_best), kept on disk under `path` (policy.pt +
    best.json) so that a resumed run still knows it. Ties keep the earlier policy."""

    def __init__(self, path: Path, accelerator, fresh: bool):
        self.path, self.accelerator = Path(path), accelerator
        if fresh and accelerator.is_main_process:
            shutil.rmtree(self.path, ignore_errors=True)
        accelerator.wait_for_everyone()
        meta = self.path / "best.json"
        self.meta = json.loads(meta.read_text()) if meta.exists() else None

    def offer(self, metrics: dict, iteration: int, policy: nn.Module) -> None:
        score = metrics.get("eval/success_rate")
        if score is None:
            raise KeyError(f"rl.keep_best: the evaluation returned no 'eval/success_rate' (keys: {sorted(metrics)})")
        from accelerate.utils import broadcast_object_list

        better = self.meta is None or float(score) > self.meta["success"]
        # every process must take the same branch (the save below waits for all): the main one decides
        better, score = broadcast_object_list([better, float(score)]) if self.accelerator.num_processes > 1 else (better, score)
        if not better:
            return
        self.meta = {"iteration": iteration, "success": float(score)}
        if self.accelerator.is_main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = self.path / "policy.pt.tmp"
            torch.save({k: v.detach().cpu() for k, v in policy.state_dict().items()}, tmp)
            tmp.replace(self.path / "policy.pt")
            (self.path / "best.json").write_text(json.dumps(self.meta))
        self.accelerator.wait_for_everyone()

    def restore(self, policy: nn.Module) -> None:
        policy.load_state_dict(torch.load(self.path / "policy.pt", map_location="cpu"))


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def train_rl(cfg: PPOConfig, policy, tokenizer, rollout_fn: RolloutFn, credit_fn: CreditFn, eval_fn: EvalFn | None,
             run_dir, accelerator, tracker, resume: bool = False, ref_model=None, *,
             tasks: Sequence[str], temperature: float = 1.0, history_turns: int = 0) -> nn.Module:
    """Train `policy` with PPO/GRPO/RLOO on the train `tasks`; returns the (unwrapped) policy.

    `temperature` is the one `rollout_fn` samples at: every log-prob (old, new, reference) and the
    entropy are taken from logits / temperature, so the PPO ratio compares the distributions the
    actions were really drawn from. `history_turns` is the rollout's history window
    (rollout.history_turns): each action is scored in the context it was sampled in.

    The reference for the KL term is, when kl_coef > 0: the policy with its LoRA adapter disabled
    (peft models: no second copy), else `ref_model`, else a frozen deep copy of the initial policy.
    """
    run_dir = Path(run_dir)
    world, gas = accelerator.num_processes, cfg.grad_accum_steps
    n_batch = cfg.tasks_per_iter * cfg.group_size
    if cfg.minibatch_size % (world * gas):
        raise ValueError(f"rl.minibatch_size={cfg.minibatch_size} must be divisible by processes x "
                         f"grad_accum_steps = {world} x {gas}")
    if n_batch % cfg.minibatch_size:
        raise ValueError(f"rl.tasks_per_iter x rl.group_size = {n_batch} must be divisible by "
                         f"rl.minibatch_size={cfg.minibatch_size}")
    if not tasks:
        raise ValueError("train_rl: the list of train tasks is empty")
    if history_turns > 0 and cfg.uses_critic:
        raise ValueError(f"rollout.history_turns={history_turns} needs a critic-free rl.algo (grpo, rloo, gigpo): "
                         f"rl.algo={cfg.algo!r} with advantage_level={cfg.advantage_level!r} uses a critic")
    if not temperature > 0:
        raise ValueError(f"train_rl: sampling temperature {temperature} must be > 0 (greedy rollouts have no "
                         "policy gradient); set rollout.temperature")
    micro = cfg.minibatch_size // (world * gas)
    est_fn = algos.ADVANTAGE_ESTIMATORS[cfg.estimator]
    kl_fn = algos.KL_ESTIMATORS[cfg.kl_estimator]

    ref_policy = None
    if cfg.kl_coef > 0 and not _is_peft(policy):
        ref_policy = ref_model if ref_model is not None else copy.deepcopy(policy)
        ref_policy.requires_grad_(False).eval().to(accelerator.device)
    model = PolicyWithValue(policy, cfg.critic if cfg.uses_critic else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    accelerator.gradient_accumulation_steps = gas
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # no prepared dataloader: DeepSpeed cannot infer these itself
        ds_cfg = ds_plugin.deepspeed_config
        for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas),
                           ("train_batch_size", cfg.minibatch_size), ("gradient_clipping", cfg.max_grad_norm)):
            if ds_cfg.get(key, "auto") == "auto":
                ds_cfg[key] = value
    if cfg.keep_best and ds_plugin is not None and ds_plugin.zero_stage == 3:
        raise ValueError("rl.keep_best=true is not supported under DeepSpeed ZeRO-3 (the policy's weights are "
                         "partitioned); use ZeRO-2 or keep_best=false")
    if cfg.keep_best and eval_fn is None:
        raise ValueError("rl.keep_best=true needs an evaluation function")
    dropout = _has_dropout(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    ckpt_root = run_dir / "checkpoints"
    start = 0
    if resume and (path := latest_checkpoint(ckpt_root)) is not None:
        start = int(load_checkpoint(accelerator, path)["iteration"])
        log.info("resumed from %s at iteration %d", path, start)
    best = BestPolicy(run_dir / "best", accelerator, fresh=start == 0) if cfg.keep_best else None

    def evaluate(iteration: int) -> None:
        model.eval()
        policy = accelerator.unwrap_model(model).policy
        timing: dict[str, float] = {}
        with phase("eval", timing):
            metrics = eval_fn(policy)
        tracker.log({**metrics, **timing}, stage="eval", step=iteration)
        if best is not None:
            best.offer(metrics, iteration, policy)

    if eval_fn is not None and cfg.eval_at_start and start == 0:
        evaluate(0)

    for it in range(start, cfg.iterations):
        # 1-3: rollout, tokenize, credit
        timing: dict[str, float] = {}
        model.eval()
        release_memory()  # each phase's peak is then its own, not the heap the last update left
        with phase("rollout", timing):
            batch_tasks = draw_tasks(tasks, cfg.tasks_per_iter, cfg.seed, it)
            trajs = rollout_fn(accelerator.unwrap_model(model).policy, batch_tasks, _iter_seed(cfg.seed, it))
        if len(trajs) != n_batch:
            raise RuntimeError(f"rollout_fn returned {len(trajs)} trajectories, expected {n_batch}")
        with phase("credit", timing):
            batch = build_batch(tokenizer, trajs, credit_fn(trajs), cfg.max_length, history_turns)

        # 4-5: old log-probs / values / reference, advantages. Without a critic and dropout, the
        # first minibatch of epoch 0 is scored by the update itself: its forward runs on the
        # weights the batch was sampled with, so old = new.detach() there exactly (ratio 1)
        perms = [group_permutation(batch.group_ids, torch.Generator().manual_seed(_iter_seed(cfg.seed, it, 1 + e)))
                 for e in range(cfg.ppo_epochs)]
        first_mb = perms[0][:cfg.minibatch_size] if not (cfg.uses_critic or dropout) else torch.arange(0)
        old_rows = batch.rows_of(torch.tensor(sorted(set(range(n_batch)) - set(first_mb.tolist())), dtype=torch.long))
        # a fresh LoRA adapter (lora_B = 0) adds nothing, so the policy is its adapter-off reference
        # bit for bit and the reference pass would recompute old_logp: share that tensor instead
        # (the first minibatch's fill_old then fills both). In practice: every run's first iteration
        ref_is_policy = (cfg.kl_coef > 0 and ref_policy is None
                         and adapter_is_identity(accelerator.unwrap_model(model).policy))
        with phase("score", timing), count_decoder_tokens() as score_run:
            old_logp, old_values, ref_logp = _score(accelerator, model, ref_policy, batch, micro, cfg.uses_critic,
                                                    cfg.kl_coef > 0 and not ref_is_policy, temperature, old_rows,
                                                    cfg.micro_batch_tokens)
            if ref_is_policy:
                ref_logp = old_logp
            mask = batch.action_mask
            adv, returns = advantages(est_fn, batch, old_values, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages and cfg.uses_critic:
                adv = algos.masked_whiten(adv, mask)

        # 6: minibatch updates (train mode: gradient checkpointing needs it; keep dropout at 0)
        reset_peak_rss()
        t2, c2 = time.perf_counter(), time.process_time()
        model.train()
        sums = torch.zeros(9, device=accelerator.device)  # token-weighted stat sums, see names below
        grad_norms = []
        lengths = batch.attention_mask.sum(1)
        for epoch, perm in enumerate(perms):
            for mb_start in range(0, n_batch, cfg.minibatch_size):
                mb = perm[mb_start:mb_start + cfg.minibatch_size]
                fill_old = epoch == 0 and mb_start == 0 and len(first_mb) > 0
                mine = batch.rows_of(mb[accelerator.process_index * micro * gas:(accelerator.process_index + 1) * micro * gas])
                # a group's rows side by side (their shared prompt is encoded once per micro-batch,
                # scoring.decoder_hidden), longest groups first (the step's gradient is a sum: order is free)
                mine = group_major_order(mine, lengths, batch.row_groups())
                # accelerate divides each loss by gas and DDP averages over processes: scale the
                # token-sum normaliser back so the step's gradient is the minibatch token mean
                norm = float(mask[batch.rows_of(mb)].sum().clamp(min=1)) / (world * gas)
                for micro_rows in torch.tensor_split(mine, gas):
                    with accelerator.accumulate(model):
                        # pieces of at most micro_batch_tokens padded tokens: activation memory is
                        # set by that budget; their gradients add up to the micro-batch's exactly
                        for idx in token_pieces(micro_rows, lengths, cfg.micro_batch_tokens):
                            length = max(int(lengths[idx].max()), 2)
                            take = lambda x: x[idx, :length].to(accelerator.device)  # noqa: E731
                            ids, attn, m = take(batch.input_ids), take(batch.attention_mask), take(mask)
                            with count_decoder_tokens() as run:  # shared prompt prefixes run once
                                logp, ent, values = model(ids, attn, m, temperature)
                            if fill_old:
                                old_logp[idx, :length] = logp.detach().float().cpu()
                            pl, clip_frac, approx_kl = algos.ppo_policy_loss(logp, take(old_logp), take(adv), m,
                                                                             cfg.clip_eps, norm)
                            loss = pl - cfg.ent_coef * algos.token_mean(ent, m, norm)
                            vl = torch.zeros((), device=ids.device)
                            if values is not None:
                                vl, _ = algos.value_loss(values, take(old_values), take(returns), m, cfg.vf_clip, norm)
                                loss = loss + cfg.vf_coef * vl
                            kl = torch.zeros((), device=ids.device)
                            if cfg.kl_coef > 0:
                                kl = algos.token_mean(kl_fn(logp, take(ref_logp)), m, norm)
                                loss = loss + cfg.kl_coef * kl
                            accelerator.backward(loss)
                            ntok = m.sum().float()
                            # pl, vl, kl are shares of the minibatch mean: scale back to token sums
                            sums += torch.stack([pl.detach() * norm, vl.detach() * norm, kl.detach() * norm,
                                                 (ent * m).sum().detach(), clip_frac * ntok, approx_kl * ntok, ntok,
                                                 attn.sum().float(), torch.tensor(float(run[0]), device=ntok.device)])
                        if accelerator.sync_gradients:
                            gn = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                            if gn is not None:  # DeepSpeed clips inside its step and returns None
                                grad_norms.append(float(gn))
                        optimizer.step()
                        optimizer.zero_grad()
        timing["update_time"] = update_time = time.perf_counter() - t2
        timing["update_cpu_time"] = time.process_time() - c2
        timing["update_peak_rss_gib"] = peak_rss_gib()
        s = accelerator.reduce(sums, reduction="sum").cpu().tolist()
        ntok = max(s[6], 1.0)

        # 7: log, eval, checkpoint
        ret = batch.step_rewards.sum(1)
        # under rl.algo=gigpo the step "rewards" are credit.mode=gigpo's advantages: their sum over an
        # episode is no reward (below 0 whenever failed episodes run longer than won ones), so it is
        # logged under its own name and `outcome` is the reward to read
        metrics = {
            "advantage_sum" if cfg.estimator == "given" else "reward": ret.mean().item(),
            "outcome": sum(t.outcome for t in trajs) / n_batch,
            "success": sum(bool(t.success) for t in trajs) / n_batch,
            "failed_episodes": sum(t.failed is not None for t in trajs),
            "steps": sum(t.num_steps for t in trajs) / n_batch,
            # the share of sampled actions the env accepted, as eval reports it for greedy episodes
            "grounding_accuracy": episode_metrics(trajs, prefix="")["grounding_accuracy"],
            "policy_loss": s[0] / ntok, "value_loss": s[1] / ntok, "kl_loss": s[2] / ntok,
            "entropy": s[3] / ntok, "clip_frac": s[4] / ntok, "approx_kl": s[5] / ntok,
            "kl_ref": algos.masked_mean(kl_fn(old_logp, ref_logp), mask).item() if cfg.kl_coef > 0 else 0.0,
            "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            "tokens_per_s": s[7] / max(update_time, 1e-9), **token_counts(batch), **timing,
            "score_sequences": len(old_rows) + (len(mask) if cfg.kl_coef > 0 and not ref_is_policy else 0),  # forwards run
            # decoder tokens actually run (real tokens minus the shared prompt prefixes encoded once)
            "score_tokens_run": int(accelerator.reduce(torch.tensor(float(score_run[0]), device=accelerator.device),
                                                       reduction="sum")),
            "update_tokens_run": s[8],
        }
        if cfg.uses_critic:
            metrics["explained_var"] = algos.explained_variance(old_values, returns, mask)
            metrics["value_mean"] = algos.masked_mean(old_values, mask).item()
        tracker.log(metrics, stage="rl", step=it + 1)
        last = it + 1 == cfg.iterations
        if eval_fn is not None and (last or (cfg.eval_every and (it + 1) % cfg.eval_every == 0)):
            evaluate(it + 1)
        if last or (cfg.save_every and (it + 1) % cfg.save_every == 0):
            save_checkpoint(accelerator, ckpt_root, it + 1, {"iteration": it + 1, "config": asdict(cfg)},
                            keep=cfg.keep_checkpoints)
    policy = accelerator.unwrap_model(model).policy
    if best is not None and best.meta is not None:
        if best.meta["iteration"] != cfg.iterations:
            best.restore(policy)
        tracker.log({"selected_iteration": best.meta["iteration"], "selected_success": best.meta["success"]},
                    stage="rl", step=cfg.iterations)
        accelerator.print(f"[rl] keep_best: the policy after iteration {best.meta['iteration']} "
                          f"(evaluation success {best.meta['success']:.3f}) is the result")
    return policy
