"""The RL batch and the model's numbers on it: trajectories tokenized into padded sequences
(`build_batch`), advantages over them (`advantages`), and log-probs / entropies / values of the
action tokens under the policy, its critic and the reference (`PolicyWithValue`, `score`).

Memory: log-probs are taken from the last hidden states through the LM head at action tokens only,
in checkpointed chunks (`algos.selected_token_logprobs`): no (B, T, V) logits ever exist, so a
forward's memory is set by the micro-batch's hidden states, not the vocabulary.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from rl import algos
from rl.trajectory import TokenView, Trajectory, tokenize_windows


def _cache_kw(module: nn.Module) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


@dataclass
class PrefixPlan:
    """How a micro-batch's rows share their prompt prefixes (see `decoder_hidden`)."""

    first: list[int]  # (B,) each row's first scored position = its prefix length
    rest: list[int]  # (B,) real tokens after the prefix
    row_of: list[int]  # (B,) index of the row's distinct prefix
    prefixes: list[tuple]  # (U,) the distinct prefixes' token ids


def prefix_plan(input_ids, attention_mask, positions) -> PrefixPlan | None:
    """The rows' shared prefixes (tokens before each row's first scored position), or None when
    no two rows share one, a row has no prefix or no row has tokens after it."""
    B = input_ids.shape[0]
    scored = positions.bool()
    lengths = attention_mask.sum(1)
    first = torch.where(scored.any(1), scored.float().argmax(1), lengths).tolist()
    distinct: dict[tuple, int] = {}
    row_of = [distinct.setdefault(tuple(input_ids[i, : first[i]].tolist()), len(distinct)) for i in range(B)]
    rest = [int(lengths[i]) - first[i] for i in range(B)]
    if len(distinct) == B or min(first) < 1 or max(rest) < 1:
        return None
    return PrefixPlan(first, rest, row_of, list(distinct))


_TOKEN_COUNTERS: list[list[int]] = []


@contextmanager
def count_decoder_tokens():
    """Count the decoder tokens `decoder_hidden` really runs inside the block (a shared prefix
    once, the full forward's real tokens otherwise); yields a one-element list holding the sum."""
    counter = [0]
    _TOKEN_COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _TOKEN_COUNTERS.remove(counter)


def _count(n: int) -> None:
    for counter in _TOKEN_COUNTERS:
        counter[0] += n


def decoder_hidden(decoder: nn.Module, input_ids, attention_mask, positions) -> torch.Tensor:
    """The decoder's last hidden states (B, T, H) for right-padded rows.

    Rows whose tokens before their first scored position are equal (the G rollouts of a task
    share the system prompt and first observation, and no action token lies in them) run that
    prefix once (`prefix_plan`): the decoder encodes each distinct prefix, its KV is copied to the
    rows that share it, and each row feeds only the rest of its tokens, at their own positions.
    Hidden states and their gradients equal the full forward's up to float rounding (tested);
    with activation checkpointing (which drops the KV cache) or no shared prefix, it is the full
    forward.
    """
    B, T = input_ids.shape
    plan = None if getattr(decoder, "gradient_checkpointing", False) else prefix_plan(input_ids, attention_mask,
                                                                                      positions)
    if plan is None:
        _count(int(attention_mask.sum()))
        return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    _count(sum(len(p) for p in plan.prefixes) + sum(plan.rest))
    from transformers import DynamicCache

    dev = input_ids.device
    first, rest = plan.first, plan.rest
    P, S = max(first), max(rest)
    pre_ids = torch.zeros(len(plan.prefixes), P, dtype=input_ids.dtype, device=dev)
    pre_mask = torch.zeros(len(plan.prefixes), P, dtype=attention_mask.dtype, device=dev)
    for u, prefix in enumerate(plan.prefixes):
        pre_ids[u, : len(prefix)] = torch.tensor(prefix, dtype=input_ids.dtype)
        pre_mask[u, : len(prefix)] = 1
    cache = DynamicCache()
    kw = _cache_kw(decoder)
    pre = decoder(input_ids=pre_ids, attention_mask=pre_mask, use_cache=True, **{kw: cache}).last_hidden_state
    rows = torch.tensor(plan.row_of, device=dev)
    cache.batch_select_indices(rows)  # indexing: gradients flow back to the shared prefix
    suf_ids = torch.zeros(B, S, dtype=input_ids.dtype, device=dev)
    suf_mask = torch.zeros(B, S, dtype=attention_mask.dtype, device=dev)
    for i in range(B):
        suf_ids[i, : rest[i]] = input_ids[i, first[i] : first[i] + rest[i]]
        suf_mask[i, : rest[i]] = 1
    start = torch.tensor(first, device=dev).unsqueeze(1)
    suf = decoder(input_ids=suf_ids, attention_mask=torch.cat([pre_mask[rows], suf_mask], 1),
                  position_ids=start + torch.arange(S, device=dev), use_cache=True, **{kw: cache}).last_hidden_state
    # position t of row i: its prefix row's hidden state below first[i], else its suffix's
    t = torch.arange(T, device=dev).unsqueeze(0)
    src = torch.where(t < start, t, P + t - start).clamp(max=P + S - 1)
    both = torch.cat([pre[rows], suf], 1)
    return both.gather(1, src.unsqueeze(-1).expand(-1, -1, both.shape[-1]))


def lm_logprobs(lm: nn.Module, input_ids, attention_mask, positions, temperature: float = 1.0):
    """Log-probs and entropies (B, T) of the tokens at `positions` under a causal LM at
    `temperature`, and its last hidden states (B, T, H). The decoder runs without its LM head
    (rows with a shared prompt prefix encode it once, `decoder_hidden`); the head runs only at the
    scored positions, in chunks (`algos.selected_token_logprobs`), so no (B, T, V) logits exist:
    with a 49k vocabulary they were most of a step's memory."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft: LoRA layers are inside
    head = base.get_output_embeddings()
    hidden = decoder_hidden(base.get_decoder(), input_ids, attention_mask, positions)
    logp, ent = algos.selected_token_logprobs(hidden, head.weight, input_ids, positions, temperature, head.bias,
                                              softcap=getattr(base.config, "final_logit_softcapping", None))
    return logp, ent, hidden


class PolicyWithValue(nn.Module):
    """The policy plus, for PPO, a critic: a Linear value head on the last hidden state of the
    policy itself ("shared") or of its own copy of the backbone ("separate").

    forward(input_ids, attention_mask, positions, temperature, with_values) -> (logp (B, T),
    entropy (B, T), values (B, T) or None): log-probs and entropies at `positions` (0 elsewhere,
    see `lm_logprobs`), values aligned like log-probs: values[:, t] = V(tokens < t), read from
    hidden state t-1.
    """

    def __init__(self, policy: nn.Module, critic: str | None):
        super().__init__()
        self.policy = policy
        self.critic_backbone = copy.deepcopy(policy) if critic == "separate" else None
        if critic:
            hidden = policy.config.hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        else:
            self.value_head = None

    def forward(self, input_ids, attention_mask, positions, temperature: float = 1.0, with_values: bool = True):
        logp, ent, hidden = lm_logprobs(self.policy, input_ids, attention_mask, positions, temperature)
        if self.value_head is None or not with_values:
            return logp, ent, None
        if self.critic_backbone is not None:
            base = self.critic_backbone
            base = base.get_base_model() if hasattr(base, "get_base_model") else base
            hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        v = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logp, ent, nn.functional.pad(v[:, :-1], (1, 0))


@dataclass
class Batch:
    """R training sequences of N trajectories: R = N, one sequence each, unless the rollout used a
    history window (then one per window block, `rl.trajectory.tokenize_windows`)."""

    input_ids: torch.Tensor  # (R, T) right-padded with the pad token
    attention_mask: torch.Tensor  # (R, T) 1 on real tokens
    action_mask: torch.Tensor  # (R, T) 1 on policy-generated tokens trained in this sequence
    step_ends: torch.Tensor  # (R, S_row) last action token of each of the sequence's steps, -1 padding
    step_rewards: torch.Tensor  # (N, S) credit per kept step of each trajectory, 0 padding
    group_ids: torch.Tensor  # (N,) integer task group
    row_traj: torch.Tensor | None = None  # (R,) trajectory of each sequence (None: row i is trajectory i)
    row_first_step: torch.Tensor | None = None  # (R,) trajectory step index of the sequence's first step

    @property
    def one_row_per_trajectory(self) -> bool:
        return self.row_traj is None

    def row_groups(self) -> torch.Tensor:
        """(R,) the task group of each sequence."""
        return self.group_ids if self.row_traj is None else self.group_ids[self.row_traj]

    def rows_of(self, trajs: torch.Tensor) -> torch.Tensor:
        """Sequence indices of the trajectories `trajs` (ascending)."""
        if self.row_traj is None:
            return trajs.sort().values
        return torch.nonzero(torch.isin(self.row_traj, trajs)).squeeze(1)


def build_batch(tokenizer, trajs: Sequence[Trajectory], rewards: Sequence[Sequence[float]], max_length: int,
                history_turns: int = 0) -> Batch:
    """Tokenize trajectories into one padded batch (with `history_turns`, each in the window blocks
    its rollout saw); rewards of steps cut by max_length are added to the last kept step."""
    if len(rewards) != len(trajs):
        raise ValueError(f"credit_fn returned {len(rewards)} reward lists for {len(trajs)} trajectories")
    views, row_traj, row_first, kept_rewards = [], [], [], []
    for b, (traj, r) in enumerate(zip(trajs, rewards)):
        if len(r) != traj.num_steps:
            raise ValueError(f"credit_fn gave {len(r)} rewards for trajectory {traj.traj_id} with {traj.num_steps} steps")
        blocks = tokenize_windows(tokenizer, traj, history_turns, max_length)
        if not blocks:  # not even the first step fits: an empty sequence without loss
            blocks = [(TokenView([], [], [], 0), 0)]
        k = sum(v.num_steps for v, _ in blocks)
        kr = [float(x) for x in r[:k]]
        if 0 < k < len(r):
            kr[-1] += float(sum(r[k:]))
        for v, first in blocks:
            views.append(v)
            row_traj.append(b)
            row_first.append(first)
        kept_rewards.append(kr)
    T = max(max(len(v.input_ids) for v in views), 2)
    R = len(views)
    pad = tokenizer.pad_token_id
    ids = torch.full((R, T), pad, dtype=torch.long)
    attn = torch.zeros(R, T, dtype=torch.long)
    amask = torch.zeros(R, T, dtype=torch.long)
    for i, v in enumerate(views):
        n = len(v.input_ids)
        ids[i, :n] = torch.tensor(v.input_ids, dtype=torch.long)
        attn[i, :n] = 1
        amask[i, :n] = torch.tensor(v.action_mask, dtype=torch.long)
    ends = algos.pad_step_ends([v.step_ends for v in views])
    width = max((len(x) for x in kept_rewards), default=0)
    windowed = history_turns > 0
    return Batch(ids, attn, amask, ends, algos.pad_step_values(kept_rewards, width),
                 torch.tensor([t.group_id for t in trajs], dtype=torch.long),
                 torch.tensor(row_traj) if windowed else None, torch.tensor(row_first) if windowed else None)


def advantages(est_fn: algos.AdvantageFn, batch: Batch, values: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns), (R, T), from the estimator. Windowed batches (critic-free estimators
    only) run it on a step view, one position per step (step s of trajectory b at [b, s]), and
    give each action token its step's advantage, with the same result as the full sequences."""
    if batch.one_row_per_trajectory:
        return est_fn(batch.step_rewards, values, batch.action_mask, batch.step_ends, batch.group_ids, gamma, lam)
    N, S = batch.step_rewards.shape
    n_steps = torch.bincount(batch.row_traj, weights=(batch.step_ends >= 0).sum(1).float(), minlength=N)
    valid = torch.arange(S).unsqueeze(0) < n_steps.unsqueeze(1)
    ends = torch.where(valid, torch.arange(S).expand(N, S), torch.full((N, S), -1))
    adv_steps, _ = est_fn(batch.step_rewards, torch.zeros(N, S), valid.long(), ends, batch.group_ids, gamma, lam)
    local = algos.token_step_index(batch.action_mask, batch.step_ends)  # (R, T) step within the sequence
    got = adv_steps[batch.row_traj].gather(1, (batch.row_first_step.unsqueeze(1) + local).clamp(0, max(S - 1, 0)))
    return torch.where(local >= 0, got, torch.zeros_like(got)), torch.zeros_like(values)


def group_permutation(group_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random order of the trajectories in which each group's members are contiguous (groups
    in random order, members in random order), so minibatches of a multiple of the group size
    hold whole groups and a group's shared prompt can be encoded once. group_ids (N,) -> (N,)."""
    order = torch.randperm(len(group_ids), generator=generator)
    groups = torch.unique(group_ids)
    rank = torch.empty(int(groups.max()) + 1 if len(groups) else 0, dtype=torch.long)
    rank[groups[torch.randperm(len(groups), generator=generator)]] = torch.arange(len(groups))
    return order[torch.argsort(rank[group_ids[order]], stable=True)]


def group_major_order(rows: torch.Tensor, lengths: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """rows ordered group by group (the group with the longest row first), each group's rows
    longest first: consecutive micro-batches then hold one group's rows together, at similar
    lengths. rows (n,), lengths and groups indexed by row -> (n,)."""
    if len(rows) == 0:
        return rows
    g = groups[rows]
    longest = torch.zeros(int(g.max()) + 1, dtype=lengths.dtype).scatter_reduce(0, g, lengths[rows], "amax",
                                                                                include_self=False)
    key = [(-int(longest[gi]), int(gi), -int(lengths[r])) for r, gi in zip(rows.tolist(), g.tolist())]
    return rows[torch.tensor(sorted(range(len(rows)), key=key.__getitem__), dtype=torch.long)]


def token_counts(batch: Batch) -> dict[str, int]:
    """The batch's real tokens by role: prompt (before the first action: system prompt + first
    observation), observation (later non-action tokens), action; and the padded size (N x T)."""
    attn, act = batch.attention_mask.bool(), batch.action_mask.bool()
    seen_action = act.long().cumsum(1) > 0
    return {"prompt_tokens": int((attn & ~seen_action).sum()), "observation_tokens": int((attn & seen_action & ~act).sum()),
            "action_tokens": int(act.sum()), "padded_tokens": int(attn.numel())}


def token_pieces(rows: torch.Tensor, lengths: torch.Tensor, max_tokens: int) -> list[torch.Tensor]:
    """Split rows into consecutive pieces whose padded size (rows x the piece's longest length)
    is at most `max_tokens`, at least one row each (0: one piece). The running longest counts, not
    the first row's: in group-major order a piece can start on one group's shortest row."""
    if max_tokens <= 0 or len(rows) == 0:
        return [rows]
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths[rows].tolist()):
        if i > start and (i + 1 - start) * max(longest, n) > max_tokens:
            out.append(rows[start:i])
            start, longest = i, 0
        longest = max(longest, n)
    out.append(rows[start:])
    return out


@torch.no_grad()
def score_rows(accelerator, fn, batch: Batch, rows: torch.Tensor, chunk: int, n_out: int,
               max_tokens: int = 0) -> list[torch.Tensor]:
    """Run `fn(ids, attn, action_mask) -> n_out x (b, L)` over the trajectories `rows` and return
    n_out x (N, T) (0 on the rows not scored).

    Rows go group by group, longest group first (`group_major_order`: a group's shared prompt
    is encoded once per micro-batch), in micro-batches of `chunk` rows, cut further into pieces of
    at most `max_tokens` padded tokens (`token_pieces`; 0: none), each cut to its own longest
    sequence (no padding to the batch's T); process p takes every P-th row of that order (equal
    shares, similar lengths) and the shares are gathered, so every process holds the same result."""
    N, T = batch.input_ids.shape
    world, dev = accelerator.num_processes, accelerator.device
    outs = [torch.zeros(N, T) for _ in range(n_out)]
    if rows.numel() == 0:
        return outs
    lengths = batch.attention_mask.sum(1)
    order = group_major_order(rows, lengths, batch.row_groups())
    if len(order) % world:  # equal shares for the gather: a few rows are scored twice
        order = torch.cat([order, order[:world - len(order) % world]])
    mine = order[accelerator.process_index::world]
    got = [torch.zeros(len(mine), T) for _ in range(n_out)]
    mine_lengths = lengths[mine]
    for s in range(0, len(mine), chunk):
        at = torch.arange(s, min(s + chunk, len(mine)))  # positions in `mine`
        for piece in token_pieces(at, mine_lengths, max_tokens):
            idx = mine[piece]
            L = max(int(lengths[idx].max()), 2)
            res = fn(*(x[idx, :L].to(dev) for x in (batch.input_ids, batch.attention_mask, batch.action_mask)))
            for g, r in zip(got, res):
                g[piece, :L] = r.float().cpu()
    ranked = torch.cat([order[r::world] for r in range(world)])
    for o, g in zip(outs, got):
        o[ranked] = accelerator.gather(g.to(dev).contiguous()).cpu()
    return outs


def score(accelerator, model, ref_policy, batch: Batch, chunk: int, want_values: bool, want_ref: bool,
           temperature: float = 1.0, old_rows: torch.Tensor | None = None, max_tokens: int = 0):
    """Old log-probs and values of the trajectories `old_rows` (default: all), reference log-probs
    of all (when `want_ref`), all at the sampling temperature and at action tokens only, in
    micro-batches of `chunk` rows and at most `max_tokens` padded tokens (`score_rows`).
    -> 3 x (N, T), 0 where not computed."""
    n = batch.input_ids.shape[0]
    old_rows = torch.arange(n) if old_rows is None else old_rows
    unwrapped = accelerator.unwrap_model(model)  # forward through `model` (ZeRO-3 needs the wrapper)

    def policy_fn(ids, attn, positions):
        with accelerator.autocast():
            logp, _, values = model(ids, attn, positions, temperature, with_values=want_values)
        return logp, (values if values is not None else torch.zeros(ids.shape, device=ids.device))

    def ref_fn(ids, attn, positions):
        with accelerator.autocast():
            if ref_policy is None:  # LoRA: the base model is the policy with its adapter off
                with unwrapped.policy.disable_adapter():
                    return model(ids, attn, positions, temperature, with_values=False)[:1]
            return lm_logprobs(ref_policy, ids, attn, positions, temperature)[:1]

    old_logp, old_values = score_rows(accelerator, policy_fn, batch, old_rows, chunk, 2, max_tokens)
    ref_logp, = score_rows(accelerator, ref_fn, batch, torch.arange(n) if want_ref else torch.arange(0), chunk, 1,
                           max_tokens)
    return old_logp, old_values, ref_logp


def has_dropout(model: nn.Module) -> bool:
    """Any active dropout (modules, or attention dropout in a config) makes a train-mode forward
    differ from the eval-mode one."""
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        if float(getattr(getattr(m, "config", None), "attention_dropout", 0.0) or 0.0) > 0:
            return True
    return False
