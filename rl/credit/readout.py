"""Where the progress estimator reads c_t in a trajectory's token sequence (`progress.read_at`).

    action       at step_ends[t], the last generated token of action t: c_t sees the history up to
                 and including action t, not what the action did (the SPA paper's choice)
    observation  at the last token before action t+1 is generated, i.e. after the environment's
                 reply to action t (obs_{t+1}) and the next generation prompt; for the last step
                 the trajectory's `final_observation` is appended as one more user turn with its
                 generation prompt, so every step has a reading position
    state        a potential of the observation alone: each observation o_0..o_{S} (o_S the
                 final one) is encoded on its own (system prompt + that user turn + generation
                 prompt), phi(o) read at its last token, and c_t = phi(o_{t+1}) - phi(o_t). The
                 SPA loss then telescopes to (phi(o_S) - phi(o_0) - R)^2: phi is fit on where
                 episodes end, and when R is a function of the final state (KeyDoor's score is
                 its progress) phi can be exactly that function, so credit lands on the step
                 that changed the state (`take key`), not on the step after which the explorer
                 always succeeded (walking onto the key). Needs observations that describe the
                 state (Markov); history-dependent progress needs `observation`.

Reading after the reply lets c_t see the consequence of action t ("You took the key."), so a
credit that sums to the outcome can sit on the step that caused the change instead of on a
position in the episode. The positions only feed the estimator: annotations stay one value per
step, and the RL trainer puts them on its own `step_ends`, so nothing downstream changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rl.trajectory import Trajectory, TrajectoryError, encode_conversation, tokenize_trajectory

READ_AT = ("action", "observation", "state")


@dataclass
class ReadView:
    input_ids: list[int]  # (T,) the (possibly truncated) token sequence
    read_pos: list[int]  # (S_kept,) token index where c_t is read, ascending
    num_steps: int  # steps kept (<= the trajectory's steps): those whose read_pos fits max_length
    obs_ids: list[list[int]] | None = None  # state: (S+1,) token ids of each observation alone


def collate_states(items: Sequence[dict], pad_id: int) -> dict:
    """Right-pad the items' distinct observation sequences into one flat batch:
    input_ids, attention_mask (N, L) with N = the number of distinct sequences (an observation
    met again, in this trajectory or another, is encoded once: phi is a function of the
    observation alone, so its rows would be identical, and on KeyDoor most rows are repeats);
    step_ends (B, S_max + 1) holds the row of observation j of item i (-1: none); step_mask
    (B, S_max) = 1 where step t exists; outcome (B,)."""
    import torch

    row_of: dict[tuple, int] = {}
    rows = torch.full((len(items), max(len(it["obs_ids"]) for it in items)), -1, dtype=torch.long)
    for b, it in enumerate(items):
        for j, s in enumerate(it["obs_ids"]):
            rows[b, j] = row_of.setdefault(tuple(s), len(row_of))
    seqs = list(row_of)
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for k, s in enumerate(seqs):
        ids[k, : len(s)], attn[k, : len(s)] = torch.tensor(s), 1
    return {"input_ids": ids, "attention_mask": attn, "step_ends": rows, "step_mask": (rows[:, 1:] >= 0).long(),
            "outcome": torch.tensor([float(it["outcome"]) for it in items])}


def observation_read_positions(action_mask: Sequence[int], step_ends: Sequence[int], length: int) -> list[int]:
    """action_mask (T,), step_ends (S,), T -> (S,) positions: for t < S-1 the token right before
    action t+1's first generated token (the first masked index after step_ends[t]; an action with
    no generated token starts after step_ends[t+1]), for t = S-1 the last token, T-1."""
    out = []
    for t in range(len(step_ends)):
        if t == len(step_ends) - 1:
            out.append(length - 1)
            continue
        start = step_ends[t + 1] + 1
        for j in range(step_ends[t] + 1, step_ends[t + 1] + 1):
            if action_mask[j]:
                start = j
                break
        out.append(start - 1)
    return out


def truncate_reads(input_ids: list[int], read_pos: list[int], max_length: int | None) -> ReadView:
    """Keep the steps whose read position lies below max_length; cut the ids after the last."""
    if not max_length or len(input_ids) <= max_length:
        return ReadView(list(input_ids), list(read_pos), len(read_pos))
    kept = [p for p in read_pos if p < max_length]
    return ReadView(list(input_ids[: kept[-1] + 1]) if kept else [], kept, len(kept))


def read_view(tokenizer, traj: Trajectory, read_at: str, max_length: int | None) -> ReadView:
    """The trajectory's tokens and c_t reading positions; raises naming the trajectory when the
    token view's steps do not match its steps."""
    if read_at not in READ_AT:
        raise ValueError(f"progress.read_at={read_at!r}; choose one of {list(READ_AT)}")
    if read_at == "state":
        obs = [s.observation for s in traj.steps] + [traj.final_observation]
        # observations are short: max_length does not apply to them
        return ReadView([], [], traj.num_steps, [encode_conversation(tokenizer, traj.system_prompt, [o], [],
                                                                     add_generation_prompt=True).input_ids for o in obs])
    if read_at == "action":
        view = tokenize_trajectory(tokenizer, traj)
        ids, pos = view.input_ids, view.step_ends
    else:
        obs = [s.observation for s in traj.steps] + [traj.final_observation]
        view = encode_conversation(tokenizer, traj.system_prompt, obs, [s.action for s in traj.steps],
                                   add_generation_prompt=True)
        ids, pos = view.input_ids, observation_read_positions(view.action_mask, view.step_ends, len(view.input_ids))
    if len(view.step_ends) != traj.num_steps:
        raise TrajectoryError(f"trajectory {traj.traj_id}: token view has {len(view.step_ends)} step ends "
                              f"for {traj.num_steps} steps")
    return truncate_reads(ids, pos, max_length)
