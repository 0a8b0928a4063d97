"""peft's LoRA forward vs rl.fused_lora's one-Function LoRA linear, side by side.

One update micro-batch of the decoder (forward + backward to the LoRA weights, the LM head left out:
it is the same in both) on SmolLM2-135M + LoRA, alternating the two paths for --repeats rounds so
that both see the same machine load. Prints seconds per micro-batch, the minor page faults each path
causes, and the ratio on its last line.

    python benchmarks/fused_lora.py --threads 2 --repeats 5
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lora-r", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from rl import fused_lora
    from rl.models import ModelConfig, load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (args.rows, args.tokens), generator=gen)
    print(f"{args.model}, {args.rows} rows x {args.tokens} tokens, {args.threads} threads, {args.repeats} rounds")
    for r in args.lora_r:
        model = load_model(ModelConfig(name=args.model, lora=True, lora_r=r, lora_alpha=2 * r, fused_lora=False), tok)
        model.train()
        with torch.no_grad():  # a trained adapter, not peft's B = 0 start
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01, generator=gen)
        decoder = model.get_base_model().model
        proj = torch.randn(decoder.config.hidden_size, generator=gen)

        def step():
            model.zero_grad(set_to_none=True)
            (decoder(input_ids=ids).last_hidden_state @ proj).square().mean().backward()

        times = {"peft": [], "fused": []}
        faults = {"peft": [], "fused": []}
        step()  # warm-up
        for _ in range(args.repeats):
            for name in ("peft", "fused"):
                (fused_lora.install if name == "fused" else fused_lora.uninstall)(model)
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in ("peft", "fused"):
            print(f"  r={r:<3} {name:5s} {med[name]:.3f} s per micro-batch (min {min(times[name]):.3f}, "
                  f"max {max(times[name]):.3f}), {statistics.median(faults[name]):.0f} minor page faults")
        print(f"r={r}: fused vs peft: {med['peft'] / med['fused']:.2f}x faster per micro-batch (median of {args.repeats})")


if __name__ == "__main__":
    main()
