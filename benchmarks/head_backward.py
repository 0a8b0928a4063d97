"""The LM head's log-prob backward: hand-written (`algos._HeadLogprobs`) against autograd through
a checkpointed `_head_logprobs`, side by side on this CPU.

    python benchmarks/head_backward.py                      # SmolLM2-135M + LoRA, 1 thread
    python benchmarks/head_backward.py --threads 2 --rows 8 --length 266 --actions 27

Two measurements, each alternating the two implementations `--repeats` times (median):
  head   the head alone: K = rows x actions hidden states -> log-probs and entropies -> backward
         of a log-prob-only loss (the RL loss without an entropy bonus), V = the model's vocabulary;
  step   one update micro-batch of the real model: `PolicyWithValue` forward + backward on `rows`
         right-padded rows of `length` tokens, groups of `group` rows sharing a `prefix`-token
         prompt, `actions` action tokens per row, in 3 turns (the iteration benchmark's blocks case
         by default), and no-grad forwards of the same batch with the adapter on and off (the KL
         reference's pass, which is what `iteration.py` divides by when a minibatch is the whole
         batch and so no old-log-prob pass runs), for the update's "forward passes".
The last line prints autograd / hand-written for both; > 1 means the hand-written one is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl import algos  # noqa: E402


def checkpointed(*args):
    """The previous implementation: autograd through the ops, recomputed in backward."""
    return torch.utils.checkpoint.checkpoint(algos._head_logprobs, *args, use_reentrant=False)


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in turn (so drifting machine load hits both)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def synthetic_batch(rows: int, length: int, group: int, prefix: int, actions: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab - 1, (rows, length), generator=g)
    for r in range(0, rows, group):
        ids[r:r + group, :prefix] = ids[r, :prefix]
    attn = torch.ones(rows, length, dtype=torch.long)
    pos = torch.zeros(rows, length, dtype=torch.long)
    turn = (length - prefix) // 3
    for k in range(3):  # 3 turns: an observation, then actions // 3 action tokens
        s = prefix + k * turn + turn - actions // 3 - 1
        pos[:, s:s + actions // 3] = 1
    return ids, attn, pos


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=8, help="rows per micro-batch")
    ap.add_argument("--length", type=int, default=266, help="tokens per row")
    ap.add_argument("--group", type=int, default=4, help="rows sharing a prompt prefix")
    ap.add_argument("--prefix", type=int, default=118, help="shared prompt tokens")
    ap.add_argument("--actions", type=int, default=27, help="action tokens per row")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from rl.models import ModelConfig, load_model, load_tokenizer
    from rl.trainers.scoring import PolicyWithValue

    tok = load_tokenizer(args.model)
    policy = load_model(ModelConfig(name=args.model, lora=True), tok)
    model = PolicyWithValue(policy, None)
    head = policy.get_base_model().get_output_embeddings().weight  # frozen, tied to the embedding
    V, H = head.shape
    K = args.rows * (args.actions // 3 * 3)

    h = torch.randn(K, H, requires_grad=True)
    targets = torch.randint(0, V, (K,))

    def head_step(fn):
        def run():
            lp, _ = fn(h, targets, head, None, 1.0, None)
            lp.sum().backward()
            h.grad = None
        return run

    t_head = alternate({"autograd": head_step(checkpointed), "hand": head_step(algos._HeadLogprobs.apply)},
                       args.repeats)

    ids, attn, pos = synthetic_batch(args.rows, args.length, args.group, args.prefix, args.actions, V)

    def step(fn=None):
        """One micro-batch forward + backward; `fn` replaces the head's autograd Function for it."""
        def run():
            with mock.patch.object(algos._HeadLogprobs, "apply", fn) if fn else contextlib.nullcontext():
                logp, _, _ = model(ids, attn, pos, 1.0)  # selected_token_logprobs looks `apply` up per call
                logp.sum().backward()
            model.zero_grad(set_to_none=True)
        return run

    def forward():
        with torch.no_grad():
            model(ids, attn, pos, 1.0)

    def forward_ref():  # the KL reference: the same forward with the adapter off (what `score` runs)
        with torch.no_grad(), policy.disable_adapter():
            model(ids, attn, pos, 1.0)

    model.train()
    t_step = alternate({"autograd": step(checkpointed), "hand": step(), "forward": forward,
                        "forward_ref": forward_ref}, args.repeats)

    print(f"{args.model} + LoRA, {torch.get_num_threads()} thread(s); head: K={K} positions x V={V}, H={H}; "
          f"step: {args.rows} rows x {args.length} tokens, groups of {args.group} sharing {args.prefix}, "
          f"{K} action tokens; median of {args.repeats}")
    print(f"{'':<28} {'autograd (checkpointed)':>24} {'hand-written backward':>22}")
    print(f"{'head fwd+bwd, s':<28} {t_head['autograd']:>24.3f} {t_head['hand']:>22.3f}")
    print(f"{'micro-batch fwd+bwd, s':<28} {t_step['autograd']:>24.3f} {t_step['hand']:>22.3f}")
    print(f"{'  in forward passes':<28} {t_step['autograd'] / t_step['forward']:>24.2f} "
          f"{t_step['hand'] / t_step['forward']:>22.2f}   (no-grad forward {t_step['forward']:.3f} s)")
    print(f"{'  in adapter-off forwards':<28} {t_step['autograd'] / t_step['forward_ref']:>24.2f} "
          f"{t_step['hand'] / t_step['forward_ref']:>22.2f}   (no-grad forward, adapter off, {t_step['forward_ref']:.3f} s)")
    print(f"autograd / hand-written: head {t_head['autograd'] / t_head['hand']:.2f}x, "
          f"micro-batch {t_step['autograd'] / t_step['hand']:.2f}x")


if __name__ == "__main__":
    main()
