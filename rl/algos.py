"""RL math as pure functions: the step->token bridge, advantages (GAE, GRPO, RLOO), PPO losses, KL.

Conventions (every function below):
- B trajectories, T tokens (right-padded), S steps (padded). Per-token tensors are aligned to the
  *target* token: `logprobs[b, t] = log pi(input_ids[b, t] | input_ids[b, :t])` and
  `values[b, t] = V(input_ids[b, :t])`, the value of the state the token is emitted from.
- `action_mask` (B, T) is 1 on tokens the policy generated; every loss is a masked token mean,
  so observation/prompt/padding tokens get zero loss and zero gradient.
- `step_ends` (B, S) is the index of the last action token of each step, -1 where a trajectory has
  fewer than S steps. Per-step quantities (rewards, credit) live there; `scatter_step_values` and
  `gather_at_step_ends` are the only bridge between the step and the token views.
- Advantage estimators share one signature (see `ADVANTAGE_ESTIMATORS`) so a trainer picks one by
  name.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.utils.checkpoint

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Step <-> token bridge


def pad_step_ends(step_ends: Sequence[Sequence[int]] | Tensor) -> Tensor:
    """Ragged per-trajectory step ends -> (B, S) long tensor padded with -1."""
    if isinstance(step_ends, Tensor):
        return step_ends.long()
    width = max((len(s) for s in step_ends), default=0)
    out = torch.full((len(step_ends), width), -1, dtype=torch.long)
    for b, ends in enumerate(step_ends):
        out[b, : len(ends)] = torch.as_tensor(list(ends), dtype=torch.long)
    return out


def pad_step_values(step_values: Sequence[Sequence[float]] | Tensor, width: int | None = None) -> Tensor:
    """Ragged per-step values -> (B, S) float tensor padded with 0."""
    if isinstance(step_values, Tensor):
        return step_values.float()
    width = max((len(v) for v in step_values), default=0) if width is None else width
    out = torch.zeros(len(step_values), width)
    for b, vals in enumerate(step_values):
        out[b, : len(vals)] = torch.as_tensor(list(vals), dtype=torch.float)
    return out


def scatter_step_values(step_values, step_ends, T: int) -> Tensor:
    """Place per-step values at their step's last action token.

    step_values (B, S) or ragged lists, step_ends (B, S) (-1 = no step) or ragged lists
    -> (B, T) with out[b, step_ends[b, s]] = step_values[b, s] and 0 elsewhere.
    """
    ends = pad_step_ends(step_ends)
    vals = pad_step_values(step_values, ends.shape[1]).to(ends.device)
    if vals.shape != ends.shape:
        raise ValueError(f"step_values {tuple(vals.shape)} and step_ends {tuple(ends.shape)} differ")
    out = torch.zeros(ends.shape[0], T, dtype=vals.dtype, device=ends.device)
    valid = ends >= 0
    rows = torch.arange(ends.shape[0], device=ends.device).unsqueeze(1).expand_as(ends)
    out[rows[valid], ends[valid]] = vals[valid]
    return out


def gather_at_step_ends(token_values: Tensor, step_ends) -> Tensor:
    """token_values (B, T), step_ends (B, S) -> (B, S): token_values[b, step_ends[b, s]], 0 at padding."""
    ends = pad_step_ends(step_ends).to(token_values.device)
    got = token_values.gather(1, ends.clamp(min=0))
    return torch.where(ends >= 0, got, torch.zeros_like(got))


def token_step_index(action_mask: Tensor, step_ends: Tensor) -> Tensor:
    """(B, T) index of the step each action token belongs to; -1 on non-action tokens.

    Token t belongs to step s = #{s' : step_ends[s'] < t}, i.e. the first step ending at or after t.
    """
    ends = pad_step_ends(step_ends).to(action_mask.device)
    big = torch.iinfo(torch.long).max
    ends_sorted = torch.where(ends >= 0, ends, torch.full_like(ends, big)).contiguous()
    pos = torch.arange(action_mask.shape[1], device=action_mask.device).expand(action_mask.shape).contiguous()
    idx = torch.searchsorted(ends_sorted, pos, right=False)
    return torch.where(action_mask.bool() & (idx < ends.shape[1]), idx, torch.full_like(idx, -1))


def step_starts(action_mask: Tensor, step_ends: Tensor) -> Tensor:
    """(B, S) index of the first action token of each step (-1 where there is no step)."""
    ends = pad_step_ends(step_ends).to(action_mask.device)
    sidx = token_step_index(action_mask, ends)
    B, T = action_mask.shape
    S = ends.shape[1]
    pos = torch.arange(T, device=action_mask.device).expand(B, T)
    out = torch.full((B, S + 1), T, dtype=torch.long, device=action_mask.device)
    # step -1 (non-action tokens) goes to a spare column S and is dropped
    out.scatter_reduce_(1, torch.where(sidx >= 0, sidx, S), pos, reduce="amin")
    out = out[:, :S]
    return torch.where(ends >= 0, out, torch.full_like(out, -1))


def broadcast_step_values(step_values: Tensor, action_mask: Tensor, step_ends: Tensor) -> Tensor:
    """(B, S) -> (B, T): every action token of step s gets step_values[b, s]; 0 elsewhere."""
    sidx = token_step_index(action_mask, step_ends)
    got = step_values.gather(1, sidx.clamp(min=0))
    return torch.where(sidx >= 0, got, torch.zeros_like(got))


# ---------------------------------------------------------------------------------------------
# Masked statistics


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x * mask) / max(sum(mask), 1)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance of x over mask (0 when fewer than 2 elements)."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1.0)
    return (((x - mean) ** 2) * mask).sum() / (n - 1).clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / (std + eps) over the masked elements; 0 outside the mask."""
    mean = masked_mean(x, mask)
    std = masked_var(x, mask).sqrt()
    return ((x - mean) / (std + eps)) * mask.to(x.dtype)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[R - V] / Var[R] over masked tokens (nan when Var[R] = 0)."""
    var_r = masked_var(returns, mask)
    if var_r.item() == 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_r)


# ---------------------------------------------------------------------------------------------
# Advantages. One signature for all estimators:
#   fn(step_rewards (B,S), values (B,T), action_mask (B,T), step_ends (B,S), group_ids (B,),
#      gamma, lam) -> (advantages (B,T), returns (B,T))
# `returns` are the critic's targets (zeros for critic-free estimators).


def gae_tokens(token_rewards: Tensor, values: Tensor, action_mask: Tensor, gamma: float, lam: float):
    """Multi-turn GAE over action tokens only (observation tokens are skipped).

    token_rewards, values, action_mask (B, T) -> advantages, returns (B, T).
    Walking t = T-1 .. 0 over action tokens, with t' the next action token after t:
        delta_t = r_t + gamma * V_{t'} - V_t            (V past the last action token = 0)
        A_t     = delta_t + gamma * lam * A_{t'}
    Observation tokens neither discount nor reset: V_{t'} and A_{t'} carry over them, so gamma
    applies once per generated token. Returns R_t = A_t + V_t; both are 0 off the mask.
    """
    mask = action_mask.to(values.dtype)
    B, T = values.shape
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    adv = torch.zeros_like(values)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        next_value = m * values[:, t] + (1 - m) * next_value
        next_adv = m * a + (1 - m) * next_adv
    return adv, (adv + values) * mask


def gae_steps(step_rewards: Tensor, step_values: Tensor, step_mask: Tensor, gamma: float, lam: float):
    """Plain GAE over turns: step_rewards, step_values, step_mask (B, S) -> advantages, returns (B, S).

    delta_s = r_s + gamma * V_{s+1} - V_s, A_s = delta_s + gamma * lam * A_{s+1}; V_{S} = 0.
    """
    return gae_tokens(step_rewards, step_values, step_mask, gamma, lam)


def gae_token_level(step_rewards, values, action_mask, step_ends, group_ids, gamma, lam):
    """Token-level multi-turn GAE: step rewards sit at step_ends, see `gae_tokens`."""
    token_rewards = scatter_step_values(step_rewards, step_ends, values.shape[1]).to(values)
    return gae_tokens(token_rewards, values, action_mask, gamma, lam)


def gae_turn_level(step_rewards, values, action_mask, step_ends, group_ids, gamma, lam):
    """Turn-level GAE: one advantage per step, shared by all its action tokens.

    The value of step s is read at its first action token: values[t] = V(tokens < t), i.e. the
    state after the observation and before any of the action (the hidden state at the end of the
    generation prompt). GAE then runs over steps (gamma, lam per turn) and A_s, R_s are broadcast
    to all of the step's action tokens (so every token of a step regresses to the same return).
    """
    ends = pad_step_ends(step_ends).to(values.device)
    starts = step_starts(action_mask, ends)
    step_mask = (ends >= 0).to(values.dtype)
    step_values = values.gather(1, starts.clamp(min=0)) * step_mask
    adv_s, ret_s = gae_steps(step_rewards.to(values), step_values, step_mask, gamma, lam)
    return (broadcast_step_values(adv_s, action_mask, ends),
            broadcast_step_values(ret_s, action_mask, ends))


def group_normalized(scores: Tensor, group_ids: Tensor, eps: float = 1e-6, scale: bool = True) -> Tensor:
    """GRPO advantage per trajectory: (R_i - mean_g R) / (std_g R + eps) over its group g.

    scores, group_ids (B,) -> (B,). std is the unbiased sample std of the group (0 for a group of
    one, so its advantage is 0). With scale=False only the mean is removed (Dr. GRPO).
    """
    gids = torch.unique(group_ids, return_inverse=True)[1]
    mean, std = _group_mean_std(scores, gids)
    centred = scores - mean[gids]
    return centred / (std[gids] + eps) if scale else centred


def _group_mean_std(scores: Tensor, gids: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std (0 for a group of one) of `scores` per group index 0..max(gids)."""
    G = int(gids.max()) + 1 if gids.numel() else 0
    count = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, gids, torch.ones_like(scores))
    mean = torch.zeros_like(count).index_add_(0, gids, scores) / count.clamp(min=1)
    sq = torch.zeros_like(count).index_add_(0, gids, (scores - mean[gids]) ** 2)
    return mean, (sq / (count - 1).clamp(min=1)).sqrt()


def leave_one_out(scores: Tensor, group_ids: Tensor) -> Tensor:
    """RLOO advantage per trajectory: R_i - mean_{j in g, j != i} R_j. scores, group_ids (B,) -> (B,).

    Equals k/(k-1) * (R_i - mean_g R) for a group of size k; 0 for a group of one.
    """
    gids = torch.unique(group_ids, return_inverse=True)[1]
    G = int(gids.max()) + 1 if gids.numel() else 0
    count = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, gids, torch.ones_like(scores))
    total = torch.zeros_like(count).index_add_(0, gids, scores)
    k = count[gids]
    baseline = (total[gids] - scores) / (k - 1).clamp(min=1)
    return torch.where(k > 1, scores - baseline, torch.zeros_like(scores))


def _broadcast_to_actions(per_traj: Tensor, action_mask: Tensor) -> Tensor:
    return per_traj.unsqueeze(1).to(action_mask.device) * action_mask.to(per_traj.dtype)


def grpo_outcome(step_rewards, values, action_mask, step_ends, group_ids, gamma, lam):
    """GRPO: R_i = sum of the trajectory's step rewards, group-normalised, same for all its tokens."""
    adv = group_normalized(step_rewards.sum(1), group_ids)
    return _broadcast_to_actions(adv, action_mask), torch.zeros_like(values)


def rloo_outcome(step_rewards, values, action_mask, step_ends, group_ids, gamma, lam):
    """RLOO: R_i minus the mean return of the other rollouts of its task, for all its tokens."""
    adv = leave_one_out(step_rewards.sum(1), group_ids)
    return _broadcast_to_actions(adv, action_mask), torch.zeros_like(values)


def grpo_step_level(step_rewards, values, action_mask, step_ends, group_ids, gamma, lam):
    """Critic-free turn-level advantage for per-step rewards (SPA, PRM): the step's discounted
    return-to-go G_{i,s} = sum_{s' >= s} gamma^(s'-s) r_{i,s'}, minus the mean return-to-go of the
    group's rollouts at the same turn s, over the std of all the group's returns-to-go:

        A_{i,s} = (G_{i,s} - mean_{j in g, j has turn s} G_{j,s}) / (std_g G + eps)

    and every token of step s gets A_{i,s}. A turn only one rollout of the group reached gets 0.

    Departure from DeepSeekMath's process supervision, which normalises each step *reward* over the
    group and then sums: when most step rewards are ~0 (SPA gives credit to a few progress steps)
    every ~0 step becomes negative and the sums push nearly every sampled token down (on quickstart
    explore data: mean advantage -3.1 per step), so the policy's entropy rose every iteration. Here
    the advantages are zero-mean for every (group, turn).
    """
    ends = pad_step_ends(step_ends).to(step_rewards.device)
    step_mask = ends >= 0
    B, S = ends.shape
    rewards = step_rewards.float() * step_mask
    to_go = torch.zeros_like(rewards)
    running = torch.zeros(B, device=rewards.device)
    for s in reversed(range(S)):
        running = rewards[:, s] + gamma * running
        to_go[:, s] = running
    gids = torch.unique(group_ids.to(rewards.device), return_inverse=True)[1].unsqueeze(1).expand(B, S)
    turn = torch.arange(S, device=rewards.device).unsqueeze(0).expand(B, S)
    g, x = gids[step_mask], to_go[step_mask]
    centred = group_normalized(x, g * S + turn[step_mask], scale=False)
    _, std = _group_mean_std(x, g)
    adv = torch.zeros_like(rewards)
    adv[step_mask] = centred / (std[g] + 1e-6)
    return broadcast_step_values(adv, action_mask, ends), torch.zeros_like(values)


def step_advantages_given(step_rewards, values, action_mask, step_ends, group_ids, gamma, lam):
    """The credit function already produced per-step advantages (GiGPO's A^E + w·A^S): every
    token of step s gets A_{i,s} as it is; no critic, no further normalisation."""
    ends = pad_step_ends(step_ends).to(step_rewards.device)
    return broadcast_step_values(step_rewards * (ends >= 0), action_mask, ends), torch.zeros_like(values)


AdvantageFn = Callable[..., tuple[Tensor, Tensor]]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "gae": gae_token_level,  # PPO with a critic, token-level multi-turn GAE
    "gae_turn": gae_turn_level,  # PPO with a critic, one advantage per turn
    "grpo": grpo_outcome,  # critic-free, group-normalised episode return
    "grpo_step": grpo_step_level,  # critic-free, return-to-go minus the group mean at the same turn
    "rloo": rloo_outcome,  # critic-free, leave-one-out baseline
    "given": step_advantages_given,  # critic-free, the credit mode's per-step advantages (gigpo)
}
CRITIC_FREE = frozenset({"grpo", "grpo_step", "rloo", "given"})


# ---------------------------------------------------------------------------------------------
# Losses


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """logits (B, T, V), input_ids (B, T) -> (B, T): out[:, t] = log softmax(logits[:, t-1])[ids[:, t]],
    out[:, 0] = 0 (the first token has no prediction)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    got = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.pad(got, (1, 0))


def _head_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float,
                 softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """z = softcap(head(h)) / temperature in fp32, and tanh(u / softcap) for its derivative."""
    z = torch.nn.functional.linear(h, weight, bias).float()
    s = None
    if softcap:
        s = torch.tanh(z / softcap)
        z = softcap * s
    return z / temperature, s


def _head_logprobs(h: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None, temperature: float,
                   softcap: float | None) -> tuple[Tensor, Tensor]:
    """h (K, H), targets (K,) -> log p(target), entropy (K,) of softmax(head(h) / temperature)."""
    z, _ = _head_logits(h, weight, bias, temperature, softcap)
    lse = torch.logsumexp(z, -1)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    return logp, lse - (torch.softmax(z, -1) * z).sum(-1)


class _HeadLogprobs(torch.autograd.Function):
    """`_head_logprobs` with a hand-written backward that recomputes the (K, V) logits once.

    Autograd through a checkpointed `_head_logprobs` recomputes the whole forward (the entropy's
    softmax included, even when the loss has no entropy term) and then runs a backward node per
    op (logsumexp, gather into a zero (K, V) block, softmax, the divisions), each a pass over
    K x V floats. Here the gradient w.r.t. the logits is one expression,
        d/dz log p(y) = onehot(y) - p,   d/dz H = -p * (z - E_p[z]),
    so backward holds z, p, dz and the entropy term's temporaries (a few (K, V) blocks), and the
    entropy's part is skipped when it has no gradient.
    """

    @staticmethod
    def forward(ctx, h, targets, weight, bias, temperature, softcap):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, targets, weight, bias)
        ctx.temperature, ctx.softcap = temperature, softcap
        return _head_logprobs(h, targets, weight, bias, temperature, softcap)  # autograd is off in here

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, targets, weight, bias = ctx.saved_tensors
        z, s = _head_logits(h, weight, bias, ctx.temperature, ctx.softcap)
        p = torch.softmax(z, -1)
        if g_logp is None:
            dz = torch.zeros_like(z)
        else:
            dz = p * -g_logp.float().unsqueeze(-1)
            dz.scatter_add_(-1, targets.unsqueeze(-1), g_logp.float().unsqueeze(-1))
        if g_ent is not None:
            ez = (p * z).sum(-1, keepdim=True)
            dz -= g_ent.float().unsqueeze(-1) * p * (z - ez)
        del p, z
        dz /= ctx.temperature
        if s is not None:
            dz *= 1 - s * s
        du = dz.to(weight.dtype)
        grad_h = (du @ weight).to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_w = du.T @ h.to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_b = du.sum(0) if bias is not None and ctx.needs_input_grad[3] else None
        return grad_h, None, grad_w, grad_b, None, None


def selected_token_logprobs(hidden: Tensor, weight: Tensor, input_ids: Tensor, positions: Tensor,
                            temperature: float = 1.0, bias: Tensor | None = None, chunk: int = 512,
                            softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies of the tokens at `positions` only, from the last hidden states.

    hidden (B, T, H) (hidden[:, t] predicts token t+1), weight (V, H) the LM head, input_ids and
    positions (B, T) -> logp, entropy (B, T) with, where positions[b, t] (t >= 1),
        logp[b, t] = log softmax(head(hidden[b, t-1]) / temperature)[input_ids[b, t]]
        entropy[b, t] = H(softmax(head(hidden[b, t-1]) / temperature))
    and 0 elsewhere: `token_logprobs(head(hidden) / temperature, ids)` at the positions, but the
    head runs on at most `chunk` rows at a time and, with autograd on, each chunk's logits are
    recomputed in its hand-written backward (`_HeadLogprobs`), so no (B, T, V) tensor and at most
    one (chunk, V) block of logits (plus its softmax and gradient) is ever alive.
    """
    B, T = input_ids.shape
    pos = positions.bool().clone()
    pos[:, 0] = False
    rows, cols = pos.nonzero(as_tuple=True)
    h = hidden[rows, cols - 1]
    targets = input_ids[rows, cols]
    logps, ents = [], []
    for s in range(0, h.shape[0], chunk):
        args = (h[s:s + chunk], targets[s:s + chunk], weight, bias, temperature, softcap)
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            lp, en = _HeadLogprobs.apply(*args)
        else:
            lp, en = _head_logprobs(*args)
        logps.append(lp)
        ents.append(en)
    zeros = torch.zeros(B, T, dtype=torch.float32, device=hidden.device)
    if not logps:
        return zeros + 0 * hidden.sum(), zeros  # keep the graph connected for backward/DDP
    idx = (rows, cols)
    return zeros.index_put(idx, torch.cat(logps)), zeros.index_put(idx, torch.cat(ents))


def entropy_from_logits(logits: Tensor) -> Tensor:
    """(..., V) -> (...): H = logsumexp(z) - sum softmax(z) * z."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def token_mean(per_token: Tensor, mask: Tensor, normalizer: float | None = None) -> Tensor:
    """sum(per_token * mask) / normalizer, the normalizer defaulting to the number of masked tokens
    (a shard of a minibatch passes the minibatch's token count so shard losses add up)."""
    mask = mask.to(per_token.dtype)
    denom = mask.sum().clamp(min=1.0) if normalizer is None else normalizer
    return (per_token * mask).sum() / denom


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    clip_eps: float, normalizer: float | None = None):
    """PPO clipped surrogate, token-level (all (B, T)).

        ratio_t = exp(logp_t - logp_old_t)
        L = mean_t max(-A_t ratio_t, -A_t clip(ratio_t, 1-eps, 1+eps))
    Returns (loss, clip_fraction, approx_kl): the mean over the mask (or sum / `normalizer`, so
    shards of one minibatch add up to its global token mean), the fraction of tokens where the
    clipped term is the active one, and k3 = mean((ratio - 1) - log ratio) of the old policy.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = token_mean(torch.maximum(unclipped, clipped), mask, normalizer)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clip_frac, approx_kl


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None,
               normalizer: float | None = None):
    """Clipped value loss (all (B, T)).

        V_clip = old_V + clip(V - old_V, -c, c)
        L = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)     (no clipping when c is None/<=0)
    Returns (loss, clip_fraction).
    """
    err = (values - returns) ** 2
    if clip is None or clip <= 0:
        return 0.5 * token_mean(err, mask, normalizer), torch.zeros(())
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    err_clip = (v_clip - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(err, err_clip), mask, normalizer)
    with torch.no_grad():
        frac = masked_mean((err_clip > err).float(), mask)
    return loss, frac


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log pi - log pi_ref (unbiased, can be negative per token)."""
    return logprobs - ref_logprobs


K3_MAX = 10.0  # per-token cap of k3 (as verl's low_var_kl)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = min(exp(ref - logp) - (ref - logp) - 1, K3_MAX) >= 0 (Schulman's low-variance estimator,
    GRPO), capped per token: exp(ref - logp) explodes on a token the policy has come to find far
    less likely than the reference does (a blocks run logged kl_ref = 1.57e3 at one iteration, ~0.05
    at the others), and its gradient then fills the whole clipped step. A capped token gets no
    KL gradient (torch.clamp's), as in verl."""
    d = ref_logprobs - logprobs
    return torch.clamp(torch.exp(d) - d - 1, max=K3_MAX)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k3": kl_k3}
