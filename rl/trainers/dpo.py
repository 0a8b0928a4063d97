"""DPO and step-DPO on explored trajectories, trained with TRL's DPOTrainer.

Loss (TRL's "sigmoid" DPO, Rafailov et al. 2023), for a prompt x with chosen y_w and rejected y_l:

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

DPO is single-turn (one prompt, two completions); a multi-turn episode is cut into that shape at a
state both trajectories share:

- `outcome_pairs`: within a task, a trajectory with a higher outcome is paired with a lower one.
  They share a history up to their first differing action (same system prompt, observations
  and earlier actions); the prompt is that shared conversation (system + alternating
  user/assistant messages, ending on the user turn), chosen/rejected are the two first differing
  actions. Credit goes to the decision where the episodes parted, not to later actions taken in
  states only one of them reached. With `completion="rest"` chosen/rejected are instead the whole
  remaining conversations; TRL cannot mask inside a completion, so later observation tokens then
  count in the log-probs too (a departure from our action-only rule; off by default).
- `step_pairs` (step-DPO): at every shared history (same task, identical conversation up to step
  t) where trajectories took different actions, the action with the higher per-step value
  `traj.annotations[key][t]` (progress estimate, Q or MC value; averaged over trajectories that
  took the same action there) is chosen, the lower rejected.

TRL renders prompt + completion with the chat template and tokenizes the text itself; the
completion's tokens are the action, its end-of-turn token and the template's trailing newline.

Pairs need a value gap strictly greater than `min_margin`; identical pairs are kept once. Prompts
longer than `max_length` lose their oldest user/assistant turns (the system prompt and the last
observation stay) so late decisions are not dropped by TRL's keep-start truncation.

Reference model: the policy the stage starts from. With a peft model TRL (1.16) keeps a frozen copy
of the adapter as the reference (a fresh adapter: the model with adapters disabled); the pipeline
hands it a fresh LoRA on the SFT policy's merged weights (`rl.models.load_model`), so both are the
SFT policy. Otherwise a frozen copy of the starting model is made (or pass `ref_model`, or set
`precompute_ref_log_probs` to score all pairs once before training and keep no second model).
TRL's own reporting is off; its logs reach `log_fn` as dpo/loss, dpo/rewards/margins, ...
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from rl.trainers.sft import LogFn, check_common, finish, keep_gradient_state, metrics_callback, quiet_progress, trainer_args
from rl.trajectory import Trajectory, build_messages, validate_trajectory

PAIR_MODES = ("outcome", "step")
COMPLETIONS = ("action", "rest")


@dataclass
class DPOStageConfig:
    pairs: Literal["outcome", "step"] = "outcome"  # by episode outcome, or step-DPO by per-step value
    completion: Literal["action", "rest"] = "action"  # outcome pairs: first differing action | rest of episode
    progress_key: str = "progress"  # step pairs: the per-step value in traj.annotations to compare
    min_margin: float = 0.0  # keep pairs whose outcome/value gap is strictly larger than this
    beta: float = 0.1  # DPO temperature: strength of the pull towards the reference
    loss_type: str = "sigmoid"  # TRL loss: sigmoid | ipo | hinge | robust | ... (see trl.DPOConfig)
    lr: float = 5e-6  # peak learning rate of AdamW
    epochs: int = 1  # passes over the pairs
    batch_size: int = 8  # pairs per device per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_length: int = 2048  # tokens of prompt + completion; older turns are dropped to fit
    warmup_ratio: float = 0.1  # fraction of optimizer steps with linear warmup
    lr_scheduler: str = "cosine"  # transformers scheduler name
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # clip the global gradient norm to this
    seed: int = 0  # data order
    logging_steps: int = 1  # call log_fn every N optimizer steps
    bf16: bool = False  # bf16 autocast (also on when the accelerator passed in uses bf16)
    precompute_ref_log_probs: bool = False  # score pairs with the reference once, before training


def _observations(traj: Trajectory) -> list[str]:
    return [s.observation for s in traj.steps]


def _actions(traj: Trajectory) -> list[str]:
    return [s.action for s in traj.steps]


def first_divergence(a: Trajectory, b: Trajectory) -> int | None:
    """Index of the first step where `a` and `b` took different actions from the same history;
    None when their histories split on an observation first or one's actions prefix the other's."""
    if a.task != b.task or a.system_prompt != b.system_prompt:
        return None
    for t, (sa, sb) in enumerate(zip(a.steps, b.steps)):
        if sa.observation != sb.observation:
            return None
        if sa.action != sb.action:
            return t
    return None


def _completion(traj: Trajectory, t: int, rest: bool) -> list[dict[str, str]]:
    if not rest:
        return [{"role": "assistant", "content": traj.steps[t].action}]
    return build_messages("", _observations(traj)[t:], _actions(traj)[t:])[1:]


def _pair(traj: Trajectory, t: int, chosen, rejected, margin: float) -> dict:
    return {"prompt": build_messages(traj.system_prompt, _observations(traj)[: t + 1], _actions(traj)[:t]),
            "chosen": chosen, "rejected": rejected, "task": traj.task, "step": t, "margin": float(margin)}


def _dedupe(pairs: list[dict]) -> list[dict]:
    seen, out = set(), []
    for p in pairs:
        key = repr((p["prompt"], p["chosen"], p["rejected"]))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def outcome_pairs(trajs: Sequence[Trajectory], completion: str = "action", min_margin: float = 0.0) -> list[dict]:
    """Preference pairs from episode outcomes, within each task (see module docstring).

    Every pair of trajectories of one task whose outcomes differ by more than `min_margin` and
    that diverge on an action gives one pair at their first differing action. Returns dicts with
    prompt (messages), chosen/rejected (assistant messages), task, step and margin (outcome gap).
    """
    if completion not in COMPLETIONS:
        raise ValueError(f"dpo.completion={completion!r}; allowed: {list(COMPLETIONS)}")
    by_task: dict[str, list[Trajectory]] = {}
    for traj in trajs:
        validate_trajectory(traj)
        by_task.setdefault(traj.task, []).append(traj)
    pairs = []
    for group in by_task.values():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                better, worse = (a, b) if a.outcome >= b.outcome else (b, a)
                gap = float(better.outcome) - float(worse.outcome)
                t = first_divergence(better, worse)
                if gap <= min_margin or t is None:
                    continue
                rest = completion == "rest"
                pairs.append(_pair(better, t, _completion(better, t, rest), _completion(worse, t, rest), gap))
    return _dedupe(pairs)


def step_pairs(trajs: Sequence[Trajectory], key: str = "progress", min_margin: float = 0.0) -> list[dict]:
    """Step-DPO pairs: at each shared history, higher-valued action vs lower-valued action.

    A history is (task, system prompt, observations o_0..o_t, actions a_0..a_{t-1}); the value of
    action a at it is the mean of `traj.annotations[key][t]` over trajectories that took a there.
    Every two distinct actions whose values differ by more than `min_margin` give one pair.
    """
    nodes: dict[tuple, dict[str, list[float]]] = {}
    first: dict[tuple, tuple[Trajectory, int]] = {}
    for traj in trajs:
        validate_trajectory(traj)
        if key not in traj.annotations:
            raise ValueError(f"trajectory {traj.traj_id} has no annotations[{key!r}] (step pairs need per-step "
                             f"values; it has {sorted(traj.annotations)})")
        obs, acts = _observations(traj), _actions(traj)
        for t, action in enumerate(acts):
            node = (traj.task, traj.system_prompt, tuple(obs[: t + 1]), tuple(acts[:t]))
            nodes.setdefault(node, {}).setdefault(action, []).append(float(traj.annotations[key][t]))
            first.setdefault(node, (traj, t))
    pairs = []
    for node, by_action in nodes.items():
        values = [(a, sum(v) / len(v)) for a, v in by_action.items()]
        traj, t = first[node]
        for i, (a, va) in enumerate(values):
            for b, vb in values[i + 1 :]:
                if abs(va - vb) <= min_margin:
                    continue
                (hi, vhi), (lo, vlo) = ((a, va), (b, vb)) if va > vb else ((b, vb), (a, va))
                pairs.append(_pair(traj, t, [{"role": "assistant", "content": hi}],
                                   [{"role": "assistant", "content": lo}], vhi - vlo))
    return _dedupe(pairs)


def _num_tokens(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def fit_prompt(tokenizer, pair: dict, max_length: int) -> dict | None:
    """Drop the oldest (user, assistant) turns of the prompt until prompt + the longer completion
    fit in `max_length` tokens; None when even the last observation alone does not fit."""
    prompt = list(pair["prompt"])
    head = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    body = prompt[len(head) :]
    while True:
        longest = max(_num_tokens(tokenizer, head + body + pair[k]) for k in ("chosen", "rejected"))
        if longest <= max_length:
            return {**pair, "prompt": head + body}
        if len(body) <= 1:
            return None
        body = body[2:]  # the oldest user observation and the action that answered it


def build_pairs(cfg: DPOStageConfig, trajs: Sequence[Trajectory]) -> list[dict]:
    if cfg.pairs not in PAIR_MODES:
        raise ValueError(f"dpo.pairs={cfg.pairs!r}; allowed: {list(PAIR_MODES)}")
    if cfg.pairs == "outcome":
        return outcome_pairs(trajs, cfg.completion, cfg.min_margin)
    return step_pairs(trajs, cfg.progress_key, cfg.min_margin)


def train_dpo(cfg: DPOStageConfig, model, tokenizer, trajs: Sequence[Trajectory], out_dir: str | Path | None,
              ref_model=None, log_fn: LogFn | None = None, accelerator=None):
    """Build preference pairs from `trajs` (cfg.pairs) and run TRL's DPOTrainer on them; returns
    the trained model and writes it (or its adapter) with the tokenizer to `out_dir` (when set)."""
    from accelerate.utils import is_peft_model
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    check_common(cfg, "dpo")
    pairs = build_pairs(cfg, trajs)
    fitted = [p for p in (fit_prompt(tokenizer, p, cfg.max_length) for p in pairs) if p is not None]
    if not fitted:
        raise ValueError(
            f"dpo: no preference pairs from {len(trajs)} trajectories (pairs={cfg.pairs!r}, min_margin="
            f"{cfg.min_margin}, {len(pairs)} before fitting max_length={cfg.max_length}); exploration must give "
            "tasks with both better and worse episodes that diverge on an action"
        )
    if ref_model is None and not is_peft_model(model) and not cfg.precompute_ref_log_probs:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in fitted]
    bf16 = cfg.bf16 or (accelerator is not None and accelerator.mixed_precision == "bf16")
    with tempfile.TemporaryDirectory(prefix="dpo-") as scratch, keep_gradient_state():
        args = trainer_args(DPOConfig, cfg, Path(scratch), bf16, beta=cfg.beta, loss_type=[cfg.loss_type],
                            max_length=cfg.max_length, precompute_ref_log_probs=cfg.precompute_ref_log_probs)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer,
                             callbacks=[metrics_callback(log_fn, "dpo")] if log_fn else None)
        quiet_progress(trainer)
        trainer.train()
        if out_dir is not None:
            finish(trainer, Path(out_dir))
    return trainer.model
