"""Online SPA: refit the progress estimator during RL on the RL stage's own recent rollouts.

The estimator fit before RL (`progress` stage) saw the SFT policy's explorations; as the policy
changes, the states it visits and the outcomes that follow them change too. With
`progress.refit_every: K` (K >= 1), every K-th call of the credit function first appends the
batch to a buffer of the last `progress.refit_buffer` trajectories, takes `progress.refit_epochs`
passes of the SPA loss over that buffer

    L = mean_i (sum_t c_{i,t} - R_i)^2

(one AdamW optimizer kept across refits, the stage's learning rates), and only then annotates the
batch, so the credit of iteration K already reflects the refit. Other calls append and annotate.

Under several processes every rank gathers the batch from all ranks (so the buffers are equal)
and refits on the same data in the same order: the ranks' estimators stay identical without a
collective in the refit. Departure: the refit state (buffer, optimizer, call count) is not
checkpointed; a resumed RL stage restarts it from the fitted estimator on disk.
"""

from __future__ import annotations

import copy
import random
from collections import deque
from typing import Callable, Sequence

import torch

from rl.credit.faithfulness import trajectory_faithfulness
from rl.credit.progress import (ProgressConfig, ProgressEstimator, _item, _pad_id, annotate_progress, collate,
                                progress_loss)
from rl.credit.readout import read_view
from rl.trajectory import Trajectory

LogFn = Callable[[dict, int], None]


def refit_epochs(estimator: ProgressEstimator, optimizer: torch.optim.Optimizer, items: Sequence[dict], pad_id: int,
                 epochs: int, batch_size: int, seed: int, grad_clip: float, micro_batch_size: int = 0) -> float:
    """`epochs` passes of the SPA loss over `items` ({input_ids, step_ends, outcome}), shuffled by
    `seed`, one optimizer step per `batch_size` items, forward/backward `micro_batch_size` at a
    time (0: the whole batch); returns the last pass's mean loss per trajectory."""
    micro = micro_batch_size or batch_size
    device = next(estimator.parameters()).device
    estimator.train()
    rng = random.Random(seed)
    total = 0.0
    for _ in range(epochs):
        order = list(range(len(items)))
        rng.shuffle(order)
        total = 0.0
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for m in range(0, len(chunk), micro):
                batch = collate([items[i] for i in chunk[m : m + micro]], pad_id)
                c = estimator(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                              batch["step_ends"].to(device))
                loss = progress_loss(c, batch["step_mask"].to(device, c.dtype), batch["outcome"].to(device, c.dtype))
                (loss * (len(c) / len(chunk))).backward()  # the chunk's mean once all are in
                total += loss.item() * len(c)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(estimator.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad()
    estimator.eval()
    return total / max(len(items), 1)


class OnlineProgress:
    """Annotate each RL batch with c_t, refitting the estimator every `cfg.refit_every` calls."""

    def __init__(self, estimator: ProgressEstimator, tokenizer, cfg: ProgressConfig, accelerator=None,
                 log_fn: LogFn | None = None):
        if cfg.refit_every < 1:
            raise ValueError(f"progress.refit_every={cfg.refit_every}: OnlineProgress needs >= 1")
        self.estimator, self.tokenizer, self.cfg = estimator, tokenizer, cfg
        self.accelerator, self.log_fn = accelerator, log_fn
        self.buffer: deque[Trajectory] = deque(maxlen=cfg.refit_buffer)
        self.calls = self.refits = 0
        body = [p for p in estimator.backbone.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW([{"params": body, "lr": cfg.lr},
                                            {"params": list(estimator.head.parameters()), "lr": cfg.head_lr}],
                                           weight_decay=cfg.weight_decay)

    def _gathered(self, trajs: Sequence[Trajectory]) -> list[Trajectory]:
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return list(trajs)
        from accelerate.utils import gather_object

        return list(gather_object(list(trajs)))

    def refit(self) -> float:
        """Passes of the SPA loss over the buffer (trajectories longer than max_length left out)."""
        items = []
        for t in self.buffer:
            view = read_view(self.tokenizer, t, self.estimator.read_at, self.cfg.max_length)
            if view.num_steps == t.num_steps:
                items.append(_item(view, t))
        self.refits += 1
        return refit_epochs(self.estimator, self.optimizer, items, _pad_id(self.tokenizer), self.cfg.refit_epochs,
                            self.cfg.batch_size, self.cfg.seed + self.refits, self.cfg.grad_clip,
                            self.cfg.micro_batch_size)

    def __call__(self, trajs: Sequence[Trajectory]) -> None:
        self.calls += 1
        # copies: the buffer must not hold the annotations and stats the trainer writes later
        self.buffer.extend(copy.deepcopy(t) for t in self._gathered(trajs))
        metrics: dict[str, float] = {}
        if self.calls % self.cfg.refit_every == 0:
            metrics["progress_online/refit_loss"] = self.refit()
            metrics["progress_online/buffer"] = float(len(self.buffer))
        annotate_progress(self.estimator, self.tokenizer, trajs, batch_size=self.cfg.batch_size,
                          max_length=self.cfg.max_length)
        # how faithful this batch's credit is, where the env reports true progress
        faithful = trajectory_faithfulness(trajs, [t.annotations["progress"] for t in trajs])
        metrics.update({f"progress_online/{k}": v for k, v in faithful.items()})
        if self.log_fn is not None and metrics:
            self.log_fn(metrics, self.calls)
