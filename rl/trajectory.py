"""Trajectories and their token view.

A trajectory is one episode: the env's system prompt, then alternating observation (user turn) and
action (assistant turn). Its token view is ONE sequence rendered with the tokenizer's chat
template:

    input_ids    (T,)  the whole conversation
    action_mask  (T,)  1 on tokens the policy generated (action text + its end-of-turn token)
    step_ends    (S,)  index of the last generated token of each step

All per-step quantities (credit, values, rewards) live at `step_ends`. The template text is
tokenised segment by segment (template/observation text, then each action separately), so the
action tokens are exactly those of the action text and the policy saw exactly these prompt tokens
at rollout time (`encode_conversation(..., add_generation_prompt=True)` builds the rollout prompt).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass
class Step:
    observation: str  # what the policy saw before acting (the user turn)
    action: str  # the policy's reply text, as generated (decoded, special tokens removed)
    valid: bool  # grounding signal: the parsed action was executable in the env
    reward: float = 0.0  # the env's reward for this step (often 0 until the end)
    info: dict[str, Any] = field(default_factory=dict)  # small JSON-able extras (e.g. progress)


@dataclass
class Trajectory:
    traj_id: int
    task: str
    steps: list[Step]
    outcome: float  # R, the episode outcome (final env score in [0, 1])
    success: bool
    group_id: int = 0  # rollouts of the same task in one batch share a group id
    system_prompt: str = ""
    final_observation: str = ""
    failed: str | None = None  # set when the env raised or timed out: the episode counts as lost
    stats: dict[str, float] = field(default_factory=dict)  # turns, tokens, invalid, wall time
    annotations: dict[str, list[float]] = field(default_factory=dict)  # per-step values by name

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trajectory":
        d = dict(d)
        d["steps"] = [Step(**s) for s in d["steps"]]
        return cls(**d)


class TrajectoryError(ValueError):
    """A trajectory that cannot be used (no steps, NaN reward, inconsistent step data)."""


def validate_trajectory(traj: Trajectory) -> None:
    """Reject trajectories the credit/trainers cannot use, naming the trajectory id."""
    if not traj.steps:
        raise TrajectoryError(f"trajectory {traj.traj_id} (task {traj.task!r}) has zero steps")
    if not math.isfinite(float(traj.outcome)):
        raise TrajectoryError(f"trajectory {traj.traj_id} has a non-finite outcome {traj.outcome}")
    for i, s in enumerate(traj.steps):
        if not math.isfinite(float(s.reward)):
            raise TrajectoryError(f"trajectory {traj.traj_id} step {i} has a non-finite reward")
    for name, values in traj.annotations.items():
        if len(values) != len(traj.steps):
            raise TrajectoryError(
                f"trajectory {traj.traj_id}: annotation {name!r} has {len(values)} values "
                f"for {len(traj.steps)} steps"
            )


# ---------------------------------------------------------------------------------------------
# Token view


@dataclass
class TokenView:
    input_ids: list[int]  # (T,)
    action_mask: list[int]  # (T,) 1 on generated tokens
    step_ends: list[int]  # (S,) last generated token of each kept step
    num_steps: int  # steps kept after truncation; <= the trajectory's steps


def build_messages(
    system_prompt: str, observations: Sequence[str], actions: Sequence[str]
) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for i, obs in enumerate(observations):
        msgs.append({"role": "user", "content": obs})
        if i < len(actions):
            msgs.append({"role": "assistant", "content": actions[i]})
    return msgs


def _render(tokenizer, msgs, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def conversation_segments(
    tokenizer,
    system_prompt: str,
    observations: Sequence[str],
    actions: Sequence[str],
    add_generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """Split the chat-template rendering into (text, is_action) segments, in order.

    Each action is located by rendering the conversation up to its generation prompt: the
    template must render a conversation's prefix as a prefix of the whole (true of ChatML,
    Llama-3 and most instruct templates); otherwise a ValueError names the problem.
    """
    if len(observations) not in (len(actions), len(actions) + 1):
        raise ValueError(f"{len(observations)} observations for {len(actions)} actions")
    msgs = build_messages(system_prompt, observations, actions)
    full = _render(tokenizer, msgs, add_generation_prompt and len(observations) > len(actions))
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for i, action in enumerate(actions):
        # messages up to and including the user turn before action i
        n_before = (1 if system_prompt else 0) + 2 * i + 1
        prefix = _render(tokenizer, msgs[:n_before], True)
        if not full.startswith(prefix) or full[len(prefix) : len(prefix) + len(action)] != action:
            start = full.find(action, max(cursor, len(prefix) - 1) if full.startswith(prefix) else cursor)
            if start < 0:
                raise ValueError(
                    "the chat template does not render action text verbatim "
                    f"(action {i}: {action[:40]!r}); strip actions before storing them"
                )
        else:
            start = len(prefix)
        segments.append((full[cursor:start], False))
        segments.append((action, True))
        cursor = start + len(action)
    segments.append((full[cursor:], False))
    return [(t, a) for t, a in segments if t or a]


def encode_conversation(
    tokenizer,
    system_prompt: str,
    observations: Sequence[str],
    actions: Sequence[str],
    add_generation_prompt: bool = False,
    train_from: int = 0,
) -> TokenView:
    """Token view of a conversation; with `add_generation_prompt` it is the rollout prompt.
    Actions before `train_from` are context only: not in `action_mask`, no step end."""
    special = set(tokenizer.all_special_ids)
    ids: list[int] = []
    mask: list[int] = []
    step_ends: list[int] = []
    prev_was_action = False
    n_action = 0
    segs = conversation_segments(tokenizer, system_prompt, observations, actions, add_generation_prompt)
    for text, is_action in segs:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if is_action:
            trained = n_action >= train_from
            n_action += 1
            ids.extend(toks)
            mask.extend([int(trained)] * len(toks))
            if trained:
                step_ends.append(len(ids) - 1)
            prev_was_action = trained
            continue
        if prev_was_action and toks and toks[0] in special:
            # the end-of-turn token right after an action was generated by the policy too
            ids.append(toks[0])
            mask.append(1)
            step_ends[-1] = len(ids) - 1
            toks = toks[1:]
        ids.extend(toks)
        mask.extend([0] * len(toks))
        prev_was_action = False
    return TokenView(ids, mask, step_ends, len(step_ends))


def truncate_view(view: TokenView, max_length: int) -> TokenView:
    """Cut a view to at most `max_length` tokens, never leaving part of an action in the loss.

    The sequence is cut right after the last step that fits whole; steps past it are dropped
    (`num_steps` says how many remain, possibly 0).
    """
    if len(view.input_ids) <= max_length:
        return view
    kept = [e for e in view.step_ends if e < max_length]
    end = kept[-1] + 1 if kept else 0
    # a step whose action starts before `end` but ends after it is impossible: step_ends ascend
    return TokenView(view.input_ids[:end], view.action_mask[:end], kept, len(kept))


def tokenize_trajectory(tokenizer, traj: Trajectory, max_length: int | None = None) -> TokenView:
    observations = [s.observation for s in traj.steps]
    actions = [s.action for s in traj.steps]
    view = encode_conversation(tokenizer, traj.system_prompt, observations, actions)
    return truncate_view(view, max_length) if max_length else view


# ---------------------------------------------------------------------------------------------
# History window (rollout.history_turns = k): the prompt of step i holds the system prompt, the
# first observation and the turns (action j, observation j+1) for j >= window_start(i, k).
#
# The window drops the oldest k turns at once when the history reaches 2k turns, so it holds the
# last k to 2k-1 turns (all of them before turn 2k). Consecutive steps with the same start share
# a prefix: the rollout extends its prompt (and KV cache) within a block and re-encodes once per
# block, and the trainer scores a block's steps in ONE sequence, each action in exactly the
# context it was sampled in. An exact last-k window would re-encode k turns at every step and
# need one training sequence per step (k times the tokens).


def window_start(step: int, history_turns: int) -> int:
    """First kept turn in the prompt of step `step` (0-based; `step` actions taken so far)."""
    if history_turns <= 0:
        return 0
    return max(0, (step // history_turns - 1) * history_turns)


def windowed_context(observations: Sequence[str], actions: Sequence[str], step: int,
                     history_turns: int) -> tuple[list[str], list[str]]:
    """(observations, actions) shown before step `step`: [obs_0] + obs[start+1 .. step] and
    actions[start .. step-1], so user and assistant turns still alternate."""
    start = window_start(step, history_turns)
    if start == 0:
        return list(observations[: step + 1]), list(actions[:step])
    return [observations[0], *observations[start + 1: step + 1]], list(actions[start:step])


def tokenize_windows(tokenizer, traj: Trajectory, history_turns: int,
                     max_length: int | None = None) -> list[tuple[TokenView, int]]:
    """Training sequences of a trajectory rolled out with a history window: one per block of
    steps sharing a window start, each (view, index of its first trained step). A view's context
    actions (before the block) have action_mask 0; its trained steps are exactly those of the
    block, each preceded by the prompt its rollout saw. Without a window: [(full view, 0)].
    `max_length` cuts each block's view (whole steps), and a cut block ends the list."""
    if history_turns <= 0:
        return [(tokenize_trajectory(tokenizer, traj, max_length), 0)]
    obs = [s.observation for s in traj.steps]
    acts = [s.action for s in traj.steps]
    out: list[tuple[TokenView, int]] = []
    first = 0
    while first < len(acts):
        start = window_start(first, history_turns)
        last = first
        while last + 1 < len(acts) and window_start(last + 1, history_turns) == start:
            last += 1
        o, a = windowed_context(obs, acts, last, history_turns)
        a.append(acts[last])
        view = encode_conversation(tokenizer, traj.system_prompt, o, a, train_from=first - start)
        n_block = last + 1 - first
        if max_length:
            view = truncate_view(view, max_length)
        if view.num_steps:
            out.append((view, first))
        if view.num_steps < n_block:
            break
        first = last + 1
    return out


# ---------------------------------------------------------------------------------------------
# Storage: a Hugging Face `datasets` dataset on disk (one row per trajectory), or JSONL.


def save_trajectories(trajs: Sequence[Trajectory], path: str | Path) -> None:
    """Save as a `datasets` dataset directory (atomically: written beside, then renamed)."""
    import shutil

    from datasets import Dataset

    path = Path(path)
    rows = [{"json": json.dumps(t.to_dict()), "task": t.task, "outcome": float(t.outcome),
             "success": bool(t.success), "num_steps": t.num_steps} for t in trajs]
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    Dataset.from_list(rows).save_to_disk(str(tmp))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def load_trajectories(path: str | Path) -> list[Trajectory]:
    path = Path(path)
    if path.suffix == ".jsonl":
        return [Trajectory.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line]
    from datasets import load_from_disk

    return [Trajectory.from_dict(json.loads(r)) for r in load_from_disk(str(path))["json"]]
