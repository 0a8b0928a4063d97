"""LoRA-B's weight gradient: autograd's layout against the transposed one, by rank, on this CPU.

    python benchmarks/lora_grad_layout.py                 # SmolLM2-135M's output widths, 1 thread
    python benchmarks/lora_grad_layout.py --ranks 8 16 32 --tokens 1024

For a LoRA `B` (an nn.Linear r -> out) autograd computes the weight gradient as g^T h, an
(out x M) @ (M x r) product over the M tokens of a micro-batch. The same numbers come out of
(h^T g)^T, an (r x M) @ (M x out) product. The update profile of `iteration.py` showed the first
running at a third of the speed of same-FLOP matmuls; this script times both layouts one after the
other (median of `--repeats` each) for each rank, token count and output width, and prints
autograd / transposed on each row and, last, the geometric mean per rank.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch


def time_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def autograd_layout(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """LoRA-B's weight gradient (out x r) as autograd computes it: g^T h."""
    return g.t().mm(h)


def transposed_layout(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The same gradient as (h^T g)^T, made contiguous as a .grad would be."""
    return h.t().mm(g).t().contiguous()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096], help="M, tokens per micro-batch")
    ap.add_argument("--outs", type=int, nargs="+", default=[192, 576, 1536],
                    help="output widths (SmolLM2-135M: k/v 192, hidden 576, MLP 1536)")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if min(args.ranks + args.tokens + args.outs) < 1 or args.repeats < 1 or args.threads < 1:
        ap.error("--ranks, --tokens, --outs, --repeats and --threads take positive integers")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.threads} thread(s), fp32, median of {args.repeats}")
    print(f"{'r':>3} {'M':>5} {'out':>5} {'g^T h ms':>9} {'(h^T g)^T ms':>13} {'ratio':>6}")
    ratios: dict[int, list[float]] = {r: [] for r in args.ranks}
    for r in args.ranks:
        for m in args.tokens:
            for out in args.outs:
                g, h = torch.randn(m, out), torch.randn(m, r)
                torch.testing.assert_close(autograd_layout(g, h), transposed_layout(g, h), rtol=1e-4, atol=1e-3)
                ta = time_ms(lambda: autograd_layout(g, h), args.repeats)
                tb = time_ms(lambda: transposed_layout(g, h), args.repeats)
                ratios[r].append(ta / tb)
                print(f"{r:>3} {m:>5} {out:>5} {ta:>9.3f} {tb:>13.3f} {ta / tb:>5.1f}x", flush=True)
    print("autograd layout / transposed, geometric mean: " + ", ".join(
        f"r={r} {math.exp(sum(map(math.log, v)) / len(v)):.2f}x" for r, v in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
