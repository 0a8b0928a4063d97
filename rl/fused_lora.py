"""A plain LoRA linear layer as one autograd Function.

peft computes `base(x) + lora_B(lora_A(x)) * scaling` as four ops, and each of the last three
allocates a fresh (tokens x out) tensor. On a CPU those allocations are not free: glibc serves large
blocks with mmap, so every new block is page-faulted in again, and on SmolLM2-135M's update shapes
the scale and the add cost more than the rank-r matmuls themselves. Autograd then computes LoRA-B's
weight gradient as g^T a, an (out x M) @ (M x r) product that runs several times slower at rank 8
than the same numbers as (a^T g)^T (benchmarks/lora_grad_layout.py).

`LoraLinearFn` adds the adapter's product into the base output in place (one `addmm_`) and writes
its backward by hand: the input gradient as one matmul plus one in-place `addmm_`, LoRA-B's weight
gradient in the fast layout. `install(model)` swaps the forward of every peft `lora.Linear` in a
model for one that takes this path when it can prove it computes the same function (a single plain
LoRA adapter, enabled and unmerged, no dropout, no LoRA bias, a frozen `nn.Linear` base in the
input's dtype, no autocast, no ZeRO-3 partitioned weights) and peft's own forward otherwise, so the
adapter-off KL reference, the merged adapter while generating, DoRA and the like are untouched.
Gradients equal autograd's through peft's forward (tests/test_fused_lora.py);
benchmarks/fused_lora.py measures it side by side.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

calls = 0  # times the fused path ran (tests count it so a silent fallback cannot pass as fused)


class LoraLinearFn(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T for a frozen W, b and trainable A (r x in), B (out x r)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])
        a = x2 @ lora_a.t()  # (M, r): the only activation LoRA adds to what the base layer keeps
        out = F.linear(x2, weight, bias)
        out.addmm_(a, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, a)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, lora_a, lora_b, a = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        ga = (g @ lora_b).mul_(s)  # (M, r): gradient w.r.t. a, scaled
        grad_b = (a.t() @ g).t().mul_(s).contiguous() if ctx.needs_input_grad[4] else None
        grad_a = ga.t() @ x2 if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(ga, lora_a).view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None


def fusable(layer, x: torch.Tensor) -> bool:
    """Whether `LoraLinearFn` computes exactly what peft's forward would for this layer and input."""
    names = layer.active_adapters
    if layer.merged or layer.disable_adapters or len(names) != 1:
        return False
    name = names[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return False
    base, lora_a, lora_b = layer.get_base_layer(), layer.lora_A[name], layer.lora_B[name]
    if type(base) is not nn.Linear or base.weight.requires_grad or getattr(layer, "fan_in_fan_out", False):
        return False
    if base.bias is not None and base.bias.requires_grad:
        return False
    if not isinstance(layer.lora_dropout[name], nn.Identity) or lora_a.bias is not None or lora_b.bias is not None:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    tensors = (base.weight, lora_a.weight, lora_b.weight)
    return all(t.dtype == x.dtype and getattr(t, "ds_id", None) is None for t in tensors)


def _forward(self, x, *args, **kwargs):
    if args or kwargs or not fusable(self, x):  # e.g. adapter_names for mixed batches
        return type(self).forward(self, x, *args, **kwargs)
    global calls
    calls += 1
    name = self.active_adapters[0]
    base = self.get_base_layer()
    return LoraLinearFn.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                              float(self.scaling[name]))


def install(model: nn.Module) -> int:
    """Route every peft `lora.Linear` of `model` through `LoraLinearFn` where `fusable`.
    -> number of layers. The swap is per instance: `uninstall` restores peft's forward."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
    return len(layers)


def uninstall(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), types.MethodType) and m.__dict__["forward"].__func__ is _forward:
            del m.forward
            n += 1
    return n
