"""Seeded, disjoint train/dev/test task splits and the information-gain progress shared by the
pure-Python LMRL-Gym envs."""

from __future__ import annotations

import math
import random
from typing import Sequence, TypeVar

from envs.base import SPLITS, EnvError

T = TypeVar("T")


def split_counts(env: str, num_train_tasks: int, num_dev_tasks: int, num_test_tasks: int) -> dict[str, int]:
    counts = dict(zip(SPLITS, (num_train_tasks, num_dev_tasks, num_test_tasks)))
    for split, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise EnvError(f"{env}: num_{split}_tasks={n!r} must be an integer >= 0")
    return counts


def assign_splits(env: str, items: Sequence[T], counts: dict[str, int], seed: int) -> dict[str, dict[str, T]]:
    """{split: {"<split>-<i>": item}}: one seeded shuffle of `items`, cut into consecutive blocks,
    so no item is in two splits. EnvError when more tasks are asked than there are items."""
    wanted = sum(counts.values())
    if wanted > len(items):
        raise EnvError(f"{env} has only {len(items)} distinct tasks, {wanted} asked "
                       f"(num_train_tasks + num_dev_tasks + num_test_tasks)")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    out: dict[str, dict[str, T]] = {}
    start = 0
    for split, n in counts.items():
        out[split] = {f"{split}-{i}": items[order[start + i]] for i in range(n)}
        start += n
    return out


def check_split(env: str, splits: dict[str, dict], split: str) -> list[str]:
    if split not in splits:
        raise EnvError(f"{env} split {split!r}: choose one of {sorted(splits)}")
    return list(splits[split])


def bits_progress(num_items: int, num_candidates: int, won: bool) -> float:
    """Ground-truth progress of a guessing game (Wordle, Twenty Questions): the bits learnt,
    log2(N_0 / N_t), over log2(N_0) + 1, and 1 once won. The extra bit is the winning guess, so
    knowing the answer and naming it are told apart and the outcome is the increments' sum."""
    if won:
        return 1.0
    return math.log2(num_items / num_candidates) / (math.log2(num_items) + 1)
