"""The SPA progress estimator: a causal-LM backbone with a scalar head read once per step.

For trajectory i with token sequence input_ids, the estimator predicts one contribution per step,
c_t = w·h(read_pos[t]) + b, where h is the backbone's last hidden state at step t's reading
position (`progress.read_at`, see `rl.credit.readout`). It is fit on outcomes alone (SPA, Wang et
al. 2025):

    L = mean_i (sum_t c_{i,t} - R_i)^2

so the contributions redistribute the delayed outcome over the steps. The backbone is any HF
causal LM (fully fine-tuned, or LoRA through peft); the head starts at zero (c_t = 0).

Departures from the paper. Its reading (`read_at: action`, the library default, kept because it
assumes nothing about the env) puts c_t at the last token of action t, where c_t cannot see what
the action did. On the quickstart's KeyDoor explorations it learnt a length penalty instead of
progress: Spearman(c_t, true increment) -0.01 [-0.19, 0.17] over 5 seeds, the top-credit step a
progress event in 7% of won episodes. Reading after the env's reply (`observation`) fits the
outcomes better but credits walking onto the key and the door, not taking and opening: the SFT
explorer always takes the key right after reaching it, so through the history the two steps are
indistinguishable from outcomes. `read_at: state` (the quickstart's setting; opt-in elsewhere)
makes c_t a difference of a potential of the observation alone, c_t = phi(o_{t+1}) - phi(o_t);
the loss telescopes to (phi(o_S) - phi(o_0) - R)^2, so phi is pinned by where episodes end, and
credit lands on the step that changed the state: on 4 of 5 quickstart seeds Spearman sits at the
ceiling its ties allow and the top-credit step is a progress event in 89-100% of won episodes.
Observations seen only mid-episode are pinned by nothing but generalisation: on seed 4 phi rated
"The key is here." above holding the key (benchmarks/results/progress_faithfulness.md). It
assumes the observation describes the state; where it does not (an inventory the text stops
mentioning), use `observation` or `action`.

Other choices: trajectories longer than `max_length` are left out of training (their kept
steps cannot be asked to sum to R), and the count is logged; at annotation time the steps such a
cut removes get c_t = 0, and `annotate_progress` returns and logs how many there were. Early
stopping and best-checkpoint selection use the validation loss (the training loss when the
validation split is empty).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn

from rl.algos import pad_step_ends
from rl.credit.faithfulness import trajectory_faithfulness
from rl.credit.readout import ReadView, collate_states, read_view
from rl.trajectory import (TokenView, Trajectory, TrajectoryError, tokenize_trajectory, truncate_view,
                           validate_trajectory)

log = logging.getLogger(__name__)

LogFn = Callable[[dict, int], None]  # (metrics, step) -> None


@dataclass
class ProgressConfig:
    lr: float = 1e-4  # AdamW learning rate of the backbone (or its LoRA adapter) and the head
    head_lr: float = 1e-3  # learning rate of the scalar head (fresh weights learn faster)
    epochs: int = 3  # maximum passes over the training split
    batch_size: int = 8  # trajectories per optimizer step (per process)
    # trajectories per forward/backward pass (0: batch_size); gradients of the micro-batches of a
    # batch are accumulated, so peak memory is set by this and the result is the same as one pass
    micro_batch_size: int = 0
    max_length: int = 2048  # tokens per trajectory; longer ones are left out of training
    val_fraction: float = 0.1  # share of trajectories held out for early stopping
    patience: int = 2  # stop after this many epochs without a better validation loss
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    lora: bool = False  # wrap the backbone in a LoRA adapter (peft) instead of training all weights
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scaling numerator
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    seed: int = 0  # fixes the validation split, the data order and LoRA initialisation
    # where c_t is read: "action" (last token of action t, the SPA paper), "observation" (after the
    # env's reply to action t), "state" (c_t = phi(o_{t+1}) - phi(o_t), phi read on each observation
    # alone); see rl.credit.readout
    read_at: Literal["action", "observation", "state"] = "action"
    refit_every: int = 0  # online SPA: refit during RL every this many iterations on recent rollouts (0: off)
    refit_buffer: int = 256  # online SPA: the most recent RL trajectories kept for refitting
    refit_epochs: int = 1  # online SPA: passes over the buffer per refit

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"progress.val_fraction={self.val_fraction}: must lie in [0, 1)")
        if self.refit_every < 0:
            raise ValueError(f"progress.refit_every={self.refit_every}: must be >= 0 (0: no online refit)")
        for name in ("epochs", "batch_size", "max_length", "patience", "refit_buffer", "refit_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"progress.{name}={getattr(self, name)}: must be >= 1")
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.batch_size % self.micro_batch_size):
            raise ValueError(f"progress.micro_batch_size={self.micro_batch_size}: must be 0 (= batch_size) or "
                             f"divide progress.batch_size={self.batch_size}")

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size


def progress_loss(step_preds: torch.Tensor, step_mask: torch.Tensor, outcomes: torch.Tensor) -> torch.Tensor:
    """SPA loss: mean_i (sum_t c_{i,t} - R_i)^2. step_preds, step_mask (B, S), outcomes (B,) -> ()."""
    return ((step_preds * step_mask).sum(1) - outcomes).pow(2).mean()


class ProgressEstimator(nn.Module):
    """backbone (causal LM, maybe peft-wrapped) + Linear(hidden, 1) read at step ends."""

    def __init__(self, backbone: nn.Module, read_at: str = "action"):
        super().__init__()
        self.backbone = backbone
        self.read_at = read_at  # where c_t is read (rl.credit.readout); saved with the weights
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        out_emb, in_emb = backbone.get_output_embeddings(), backbone.get_input_embeddings()
        if out_emb is not None and out_emb.weight is not in_emb.weight:
            # the LM head takes no part in the loss; a trainable unused weight breaks DDP
            out_emb.weight.requires_grad_(False)

    def _trunk(self) -> nn.Module:
        model = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        return model.get_decoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step_ends: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (B, T), step_ends (B, S): each step's reading position (-1 = no
        step) -> c (B, S), 0 at padding."""
        hidden = self._trunk()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.read_at == "state":
            # input_ids (N, L): one observation per row; step_ends (B, S+1): rows of o_0..o_S
            last = hidden[torch.arange(len(hidden)), attention_mask.sum(1) - 1]  # (N, H)
            phi = self.head(last.to(self.head.weight.dtype)).squeeze(-1)  # (N,)
            valid = step_ends >= 0
            p = phi[step_ends.clamp(min=0)] * valid  # (B, S+1)
            return (p[:, 1:] - p[:, :-1]) * valid[:, 1:]  # c_t = phi(o_{t+1}) - phi(o_t), (B, S)
        ends = step_ends.clamp(min=0)
        at_ends = hidden.gather(1, ends.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, S, H)
        c = self.head(at_ends.to(self.head.weight.dtype)).squeeze(-1)
        return c * (step_ends >= 0)

    def save(self, out_dir: str | Path) -> Path:
        """Write head + backbone (full weights, or the LoRA adapter when its base is on disk)
        atomically: into `<out_dir>.tmp`, then renamed over `out_dir`."""
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(tmp / "head.safetensors"))
        backbone = self.backbone
        if hasattr(backbone, "merge_and_unload"):
            base = getattr(backbone.peft_config.get("default"), "base_model_name_or_path", None)
            if not base or not Path(base).is_dir():
                # an in-memory base cannot be found again at load time: store merged full weights
                import copy

                backbone = copy.deepcopy(backbone).merge_and_unload()
        backbone.save_pretrained(tmp / "backbone")
        (tmp / "estimator.json").write_text(json.dumps({"hidden_size": self.head.in_features,
                                                         "read_at": self.read_at}))
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return out

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype | None = None) -> "ProgressEstimator":
        path = Path(path)
        if not (path / "head.safetensors").exists() or not (path / "backbone").is_dir():
            raise FileNotFoundError(f"{path} is not a progress estimator (needs head.safetensors and backbone/)")
        from safetensors.torch import load_file

        if (path / "backbone" / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM

            backbone = AutoPeftModelForCausalLM.from_pretrained(path / "backbone", dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM

            backbone = AutoModelForCausalLM.from_pretrained(path / "backbone", dtype=dtype)
        meta = json.loads((path / "estimator.json").read_text()) if (path / "estimator.json").exists() else {}
        est = cls(backbone, read_at=meta.get("read_at", "action"))
        est.head.load_state_dict(load_file(str(path / "head.safetensors")))
        return est.eval()


def load_estimator_for(path: str | Path, accelerator=None) -> ProgressEstimator:
    """Load a saved estimator for inference, on the accelerator's device when given."""
    est = ProgressEstimator.load(path)
    return est.to(accelerator.device) if accelerator is not None else est


# ---------------------------------------------------------------------------------------------
# Token views and batches


def checked_view(tokenizer, traj: Trajectory, max_length: int | None) -> TokenView:
    """The trajectory's token view, truncated to `max_length`; raises naming the trajectory when
    the untruncated view's step_ends do not match its steps."""
    view = tokenize_trajectory(tokenizer, traj)
    if len(view.step_ends) != traj.num_steps or view.num_steps != traj.num_steps:
        raise TrajectoryError(f"trajectory {traj.traj_id}: token view has {len(view.step_ends)} step ends "
                              f"for {traj.num_steps} steps")
    return truncate_view(view, max_length) if max_length else view


def collate(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad {input_ids, step_ends, outcome} items into (B, T) ids/mask, (B, S) ends and step
    mask, (B,) R; items of the `state` reading ({obs_ids, outcome}) go to `collate_states`."""
    if "obs_ids" in items[0]:
        return collate_states(items, pad_id)
    T = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), T), dtype=torch.long)
    for b, it in enumerate(items):
        ids[b, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        attn[b, : len(it["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": attn, "step_ends": pad_step_ends([it["step_ends"] for it in items]),
            "outcome": torch.tensor([float(it["outcome"]) for it in items]),
            "step_mask": (pad_step_ends([it["step_ends"] for it in items]) >= 0).long()}


def _item(view: ReadView, traj: Trajectory) -> dict:
    if view.obs_ids is not None:
        return {"obs_ids": view.obs_ids, "outcome": float(traj.outcome)}
    return {"input_ids": view.input_ids, "step_ends": view.read_pos, "outcome": float(traj.outcome)}


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------
# Fit and annotate


def _wrap_lora(backbone, cfg: ProgressConfig):
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return get_peft_model(backbone, lcfg)


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, math.ceil(val_fraction * n)) if val_fraction > 0 and n > 1 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


def constant_baseline_loss(train_outcomes: Sequence[float], val_outcomes: Sequence[float]) -> float:
    """The SPA loss of an estimator that ignores the trajectory and predicts the mean training
    outcome: mean_val (mean_train R - R)^2. An estimator near it has learnt nothing usable."""
    mean = float(np.mean(train_outcomes))
    return float(np.mean([(mean - r) ** 2 for r in val_outcomes]))


def credit_cv(step_credits: Sequence[float]) -> float:
    """Coefficient of variation std(c)/|mean(c)| over all steps. Near 0: every step gets about the
    same credit, so SPA degenerates to a spread-out outcome, and (c_t > 0 on average) a longer
    episode collects more reward. Credit concentrated on a few steps gives values well above 1."""
    c = np.asarray(step_credits, dtype=float)
    return float(c.std() / max(abs(c.mean()), 1e-8)) if c.size else float("nan")


def _mean_loss(model, loader, accelerator) -> float:
    """Mean over the loader's trajectories of (sum_t c_t - R)^2, gathered across processes."""
    model.eval()
    errs = []
    with torch.no_grad():
        for batch in loader:
            c = model(batch["input_ids"], batch["attention_mask"], batch["step_ends"])
            errs.append(accelerator.gather_for_metrics((c.sum(1) - batch["outcome"]).pow(2)))
    model.train()
    return torch.cat(errs).mean().item() if errs else float("nan")


def fit_progress_estimator(cfg: ProgressConfig, trajs: Sequence[Trajectory], tokenizer, backbone, out_dir: str | Path,
                           accelerator=None, log_fn: LogFn | None = None) -> ProgressEstimator:
    """Fit c_t on the trajectories' outcomes; keep and save (atomically) the best epoch.

    `backbone` is a causal LM (already peft-wrapped, or wrapped here when `cfg.lora`). Returns the
    unwrapped estimator holding the best weights, also saved in `out_dir`. Runs under `accelerate`
    (data sharded over processes; the main process saves).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg.validate()
    accelerator = accelerator or Accelerator()
    items, item_traj = [], []
    for j, t in enumerate(trajs):
        validate_trajectory(t)
        view = read_view(tokenizer, t, cfg.read_at, cfg.max_length)
        if view.num_steps == t.num_steps:
            items.append(_item(view, t))
            item_traj.append(j)
    n_cut = len(trajs) - len(items)
    if not items:
        raise ValueError(f"progress: all {len(trajs)} trajectories exceed progress.max_length={cfg.max_length}")
    if n_cut:
        log.warning("progress: %d of %d trajectories exceed max_length=%d and are left out of training",
                    n_cut, len(trajs), cfg.max_length)
    train_idx, val_idx = _split(len(items), cfg.val_fraction, cfg.seed)
    if cfg.lora and not hasattr(backbone, "peft_config"):
        backbone = _wrap_lora(backbone, cfg)
    estimator = ProgressEstimator(backbone, read_at=cfg.read_at)
    head_params = list(estimator.head.parameters())
    body_params = [p for p in estimator.backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": body_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}],
                                  weight_decay=cfg.weight_decay)
    pad = _pad_id(tokenizer)
    # the loaders yield micro-batches; `accum` of them make one optimizer step of batch_size
    make = lambda idx, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        [items[i] for i in idx], batch_size=cfg.micro, shuffle=shuffle, collate_fn=lambda b: collate(b, pad),
        generator=torch.Generator().manual_seed(cfg.seed))
    accum = cfg.batch_size // cfg.micro
    train_loader, val_loader = make(train_idx, True), make(val_idx, False)
    model, optimizer, train_loader = accelerator.prepare(estimator, optimizer, train_loader)
    if val_idx:
        val_loader = accelerator.prepare(val_loader)
    main = accelerator.is_main_process
    outcomes = [items[i]["outcome"] for i in train_idx]
    constant = constant_baseline_loss(outcomes, [items[i]["outcome"] for i in val_idx] or outcomes)
    best, best_state, stale, step = math.inf, None, 0, 0
    for epoch in range(cfg.epochs):
        model.train()
        running, seen, in_batch = 0.0, 0, 0
        n_micro = len(train_loader)
        for i, batch in enumerate(tqdm(train_loader, desc=f"progress epoch {epoch}",
                                       disable=not accelerator.is_local_main_process)):
            last = (i + 1) % accum == 0 or i + 1 == n_micro
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                c = model(batch["input_ids"], batch["attention_mask"], batch["step_ends"])
                loss = progress_loss(c, batch["step_mask"].to(c.dtype), batch["outcome"].to(c.dtype))
                # sum over the batch's trajectories / batch_size: the batch mean once all are in
                accelerator.backward(loss * (len(c) / cfg.batch_size))
            in_batch += len(c)
            running, seen = running + loss.item() * len(c), seen + len(c)
            if not last:
                continue
            if in_batch != cfg.batch_size:  # a short last batch: still its own mean
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(cfg.batch_size / in_batch)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad()
            in_batch, step = 0, step + 1
        train_loss = running / max(seen, 1)
        val_loss = _mean_loss(model, val_loader, accelerator) if val_idx else train_loss
        if log_fn is not None:
            log_fn({"progress/train_loss": train_loss, "progress/val_loss": val_loss, "progress/epoch": epoch,
                    "progress/val_loss_constant": constant, "progress/left_out_too_long": n_cut}, step)
        if val_loss < best:
            best, stale = val_loss, 0
            unwrapped = accelerator.unwrap_model(model)
            best_state = {k: p.detach().cpu().clone() for k, p in unwrapped.named_parameters() if p.requires_grad}
            if main:
                unwrapped.save(out_dir)
            accelerator.wait_for_everyone()
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    estimator = accelerator.unwrap_model(model)
    estimator.load_state_dict(best_state, strict=False)
    # every process scores the whole (small) validation split itself: per-trajectory credits for
    # the CV and for the faithfulness to the env's true progress, where the env reports it
    held = [trajs[item_traj[i]] for i in (val_idx or train_idx)]
    credits = predict_progress(estimator, tokenizer, held, batch_size=cfg.micro, max_length=cfg.max_length)
    cv = credit_cv([c for cs in credits for c in cs])
    faithful = {f"progress/{k}": v for k, v in trajectory_faithfulness(held, credits).items()}
    if log_fn is not None:
        log_fn({"progress/best_val_loss": best, "progress/val_loss_constant": constant, "progress/credit_cv": cv,
                **faithful}, step)
    if main and (best > 0.8 * constant or cv < 0.5):
        log.warning("progress: weak estimator (best val loss %.4f vs %.4f for predicting the mean outcome; credit "
                    "CV %.2f): SPA credit will be close to a uniform spread of the outcome, which favours long "
                    "episodes; consider more epochs, a higher progress.lr, or credit.spa_add_outcome=true",
                    best, constant, cv)
    return estimator.eval()


@torch.no_grad()
def predict_progress(estimator: ProgressEstimator, tokenizer, trajs: Sequence[Trajectory], batch_size: int = 8,
                     max_length: int | None = None) -> list[list[float]]:
    """c_t for every step of every trajectory, read where the estimator was fit to read
    (`estimator.read_at`); steps past `max_length` get none (the lists are then shorter)."""
    estimator = getattr(estimator, "module", estimator)
    was_training = estimator.training
    estimator.eval()
    device = next(estimator.parameters()).device
    views = []
    for t in trajs:
        validate_trajectory(t)
        views.append(read_view(tokenizer, t, getattr(estimator, "read_at", "action"), max_length))
    order = sorted((i for i, v in enumerate(views) if v.num_steps > 0), key=lambda i: len(views[i].input_ids))
    preds: list[list[float]] = [[] for _ in trajs]
    pad = _pad_id(tokenizer)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([_item(views[i], trajs[i]) for i in chunk], pad)
        c = estimator(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["step_ends"].to(device))
        for row, i in enumerate(chunk):
            preds[i] = c[row, : views[i].num_steps].float().cpu().tolist()
    estimator.train(was_training)
    return preds


def annotate_progress(estimator: ProgressEstimator, tokenizer, trajs: Sequence[Trajectory], batch_size: int = 8,
                      max_length: int | None = None) -> dict[str, int]:
    """Set `traj.annotations["progress"]` = [c_0, ..., c_T] on every trajectory (in place).

    Steps cut by `max_length` get c_t = 0; their count is stored in `traj.stats["progress_cut_steps"]`,
    logged, and returned with the totals: {"trajectories", "cut_trajectories", "cut_steps"}.
    """
    preds = predict_progress(estimator, tokenizer, trajs, batch_size, max_length)
    cut_trajs = cut_steps = 0
    for t, kept in zip(trajs, preds):
        cut = t.num_steps - len(kept)
        t.annotations["progress"] = kept + [0.0] * cut
        t.stats["progress_cut_steps"] = float(cut)
        cut_trajs, cut_steps = cut_trajs + (cut > 0), cut_steps + cut
    if cut_steps:
        log.warning("annotate_progress: %d steps of %d trajectories lie past max_length=%s and got c_t = 0",
                    cut_steps, cut_trajs, max_length)
    return {"trajectories": len(trajs), "cut_trajectories": cut_trajs, "cut_steps": cut_steps}
