"""Behaviour cloning (SFT) on expert trajectories, with the loss on action tokens only.

Loss, for a batch of trajectories with token views (input_ids x, action_mask m):

    L = - sum_{b,i} m[b,i] * log p(x[b,i] | x[b,<i]) / sum_{b,i} m[b,i]

the mean next-token NLL over the policy's own tokens (action text + its end-of-turn token); prompt
and observation tokens are context only and get zero gradient. The mean is over all action tokens
of one optimizer step (gradient accumulation and data-parallel shards included), not a mean of
per-sequence means, so long trajectories weigh by their number of action tokens.

Why TRL's SFTTrainer and not our own loop: TRL 1.16's SFTTrainer takes a pre-tokenized dataset
with an explicit `labels` column (`dataset_kwargs={"skip_prepare_dataset": True}`): it then does no
re-tokenization, no truncation and no re-masking, and its collator pads `labels` with -100, so it
trains on exactly our `action_mask`. Its loss is the token mean above (it divides by the number of
label tokens across accumulation steps and processes), it runs unchanged under `accelerate launch`
(tested with 2 CPU processes) and uses the Trainer's DeepSpeed integration (`trainer.save_model`
gathers ZeRO-3 shards; not exercised by the CPU tests). Departures from TRL's defaults: no
activation checkpointing from the Trainer (`ModelConfig.gradient_checkpointing` turns it on in the
model) and no bf16 unless asked (TRL turns both on), no checkpoints during the stage,
`report_to="none"` (metrics go through `log_fn`). `tests/test_sft.py` checks the logged loss
against `masked_token_nll` computed by hand.

Note: the Trainer builds its own `Accelerator`; accelerate's process state is shared per process,
so it joins the same process group as the pipeline's accelerator. The pipeline's accelerator only
chooses mixed precision here, and its gradient-accumulation settings are restored afterwards.

With a peft (LoRA) model only the adapter is saved; `rl.models.load_model` loads such a directory
directly, and `AutoPeftModelForCausalLM.from_pretrained(out_dir).merge_and_unload()
.save_pretrained(merged_dir)` merges it into full weights. When the base model has no directory or
hub id to be found by (the built-in tiny model), the merged weights are saved instead.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from rl.models import adapter_base_missing
from rl.trajectory import Trajectory, tokenize_windows, validate_trajectory

IGNORE_INDEX = -100  # label of tokens outside the loss (transformers' convention)
LogFn = Callable[[dict[str, float], int], None]  # log_fn(metrics, step)


@dataclass
class SFTConfig:
    lr: float = 1e-4  # peak learning rate of AdamW
    epochs: int = 3  # passes over the demonstrations
    batch_size: int = 8  # trajectories per device per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_length: int = 2048  # tokens per trajectory; steps that do not fit whole are dropped
    warmup_ratio: float = 0.1  # fraction of optimizer steps with linear warmup
    lr_scheduler: str = "cosine"  # transformers scheduler name: cosine | linear | constant | ...
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    seed: int = 0  # data order and dropout
    logging_steps: int = 1  # call log_fn every N optimizer steps
    bf16: bool = False  # bf16 autocast (also on when the accelerator passed in uses bf16)
    only_successful: bool = False  # clone only trajectories with success=True (filtered BC)


def masked_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over labelled positions: the SFT loss.

    logits (B, T, V), labels (B, T) with IGNORE_INDEX outside the loss. Position i's logits
    predict labels[i + 1]:  L = -sum_{b,i} log softmax(logits[b,i])[labels[b,i+1]] / #labelled.
    """
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    keep = targets != IGNORE_INDEX
    token_logp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(token_logp * keep).sum() / keep.sum().clamp(min=1)


def sft_examples(tokenizer, trajs: Sequence[Trajectory], max_length: int,
                 history_turns: int = 0) -> list[dict[str, list[int]]]:
    """{"input_ids", "labels"} rows; labels are input_ids on action tokens and IGNORE_INDEX
    elsewhere. One row per trajectory, or with `history_turns` = k > 0 one per block of steps of
    the rollout's history window (`tokenize_windows`): each action is cloned in the context the
    policy will see when it acts, the same sequences the RL trainer scores. Rows left with no
    whole step after truncation are dropped."""
    rows = []
    for traj in trajs:
        validate_trajectory(traj)
        for view, _ in tokenize_windows(tokenizer, traj, history_turns, max_length):
            if view.num_steps == 0:
                continue
            labels = [t if m else IGNORE_INDEX for t, m in zip(view.input_ids, view.action_mask)]
            rows.append({"input_ids": view.input_ids, "labels": labels})
    if not rows:
        raise ValueError(f"sft: no trajectory has a step that fits in max_length={max_length} tokens")
    return rows


def metrics_callback(log_fn: LogFn, prefix: str):
    """A TrainerCallback forwarding the Trainer's logs to `log_fn({prefix/name: value}, step)`,
    on the main process only."""
    from transformers import TrainerCallback

    class _Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:
                return
            metrics = {f"{prefix}/{k}": float(v) for k, v in logs.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            log_fn(metrics, int(state.global_step))

    return _Forward()


def quiet_progress(trainer) -> None:
    """Keep the Trainer's progress bar but not its per-step printout of the log dict: metrics go
    to metrics.jsonl / the trackers through `metrics_callback` instead."""
    from transformers.trainer_callback import ProgressCallback

    class _Bar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_Bar())


def check_common(cfg, stage: str) -> None:
    """Fail early, naming the key, on values the Trainer would reject late or misread."""
    for key in ("epochs", "batch_size", "grad_accum_steps", "max_length", "logging_steps"):
        if int(getattr(cfg, key)) <= 0:
            raise ValueError(f"{stage}.{key} must be a positive integer, got {getattr(cfg, key)!r}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ValueError(f"{stage}.warmup_ratio must be in [0, 1), got {cfg.warmup_ratio!r}")
    if cfg.lr < 0:
        raise ValueError(f"{stage}.lr must be >= 0, got {cfg.lr!r}")


def trainer_args(config_cls, cfg, out_dir: Path, bf16: bool, **extra):
    """TRL/transformers training arguments shared by the SFT and DPO stages (warmup_steps < 1 is
    read by transformers as a ratio of the optimizer steps)."""
    return config_cls(
        output_dir=str(out_dir), learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum_steps,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, data_seed=cfg.seed, logging_steps=cfg.logging_steps,
        bf16=bf16, fp16=False, activation_checkpointing=False, save_strategy="no", report_to="none",
        dataloader_num_workers=0, dataloader_pin_memory=False, **extra,
    )


def finish(trainer, out_dir: Path) -> None:
    """Save model (or adapter) + tokenizer to out_dir atomically: temp dir on the side, then rename.
    A LoRA model whose base cannot be found again by name is saved merged (full weights)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    acc = trainer.accelerator
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    if adapter_base_missing(trainer.model):
        if acc.is_main_process:
            copy.deepcopy(trainer.model).merge_and_unload().save_pretrained(tmp)
            trainer.processing_class.save_pretrained(tmp)
    else:
        trainer.save_model(str(tmp))  # every process joins: ZeRO-3 gathers shards; the main one writes
    if acc.is_main_process:
        (tmp / "training_args.bin").unlink(missing_ok=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    acc.wait_for_everyone()


@contextmanager
def keep_gradient_state():
    """The Trainer's own Accelerator rewrites accelerate's GradientState, which every Accelerator in
    the process shares (the pipeline's `gradient_accumulation_steps` would read 1 afterwards): put
    the caller's settings back when training ends."""
    from accelerate.state import GradientState

    shared = GradientState._shared_state
    saved = {k: shared[k] for k in ("plugin_kwargs", "sync_gradients") if k in shared}
    try:
        yield
    finally:
        shared.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items()})


def fit_examples(cfg: SFTConfig, model, tokenizer, rows: list[dict], out_dir: str | Path | None,
                 bf16: bool = False, log_fn: LogFn | None = None):
    """Train on prepared {"input_ids", "labels"} rows exactly as given; save to out_dir if set."""
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    with tempfile.TemporaryDirectory(prefix="sft-") as scratch, keep_gradient_state():
        args = trainer_args(TRLSFTConfig, cfg, Path(scratch), bf16 or cfg.bf16, max_length=None, packing=False,
                            padding_free=False, dataset_kwargs={"skip_prepare_dataset": True},
                            disable_tqdm=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer,
                             callbacks=[metrics_callback(log_fn, "sft")] if log_fn else None)
        quiet_progress(trainer)
        trainer.train()
        if out_dir is not None:
            finish(trainer, Path(out_dir))
    return trainer.model


def train_sft(cfg: SFTConfig, model, tokenizer, trajs: Sequence[Trajectory], out_dir: str | Path | None,
              accelerator=None, log_fn: LogFn | None = None, history_turns: int = 0):
    """Behaviour-clone `trajs` into `model` (full or peft); returns the trained model and writes it
    with the tokenizer to `out_dir` (skipped when None). `history_turns`: the rollout's history
    window (see `sft_examples`), so SFT trains on the prompts the policy is later given.
    Metrics: sft/loss, sft/grad_norm, sft/learning_rate, sft/mean_token_accuracy, sft/entropy at
    each logged optimizer step, and sft/train_loss (mean over the stage), sft/train_runtime at the end."""
    check_common(cfg, "sft")
    if cfg.only_successful:
        trajs = [t for t in trajs if t.success]
    if not trajs:
        raise ValueError("sft: no trajectories to clone" + (" (only_successful=True)" if cfg.only_successful else ""))
    rows = sft_examples(tokenizer, trajs, cfg.max_length, history_turns)
    bf16 = accelerator is not None and accelerator.mixed_precision == "bf16"
    return fit_examples(cfg, model, tokenizer, rows, out_dir, bf16=bf16, log_fn=log_fn)


@torch.no_grad()
def action_nll(model, tokenizer, trajs: Sequence[Trajectory], max_length: int = 2048) -> float:
    """Mean NLL per action token of `trajs` under `model` (one sequence at a time): a held-out
    check of how well the policy reproduces demonstrations."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for row in sft_examples(tokenizer, trajs, max_length):
        ids = torch.tensor([row["input_ids"]], device=device)
        labels = torch.tensor([row["labels"]], device=device)
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total += float(masked_token_nll(model(input_ids=ids).logits, labels)) * n
        count += n
    return total / max(count, 1)
