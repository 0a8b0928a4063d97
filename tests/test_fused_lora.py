"""rl.fused_lora: a plain LoRA linear as one autograd Function computes peft's function and
gradients, runs where it can prove that, and falls back to peft's forward everywhere else."""

import copy

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

from rl import fused_lora
from rl.models import ModelConfig, load_model, load_tokenizer

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 250, 3], [8, 9, 10, 11, 12, 13, 14, 15]])


class TwoLinear(nn.Module):
    """A base linear with a bias (as Qwen's q/k/v have) and one without."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20, bias=True)
        self.down = nn.Linear(20, 12, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _lora(module, r=4, **kw):
    torch.manual_seed(0)
    model = get_peft_model(module, LoraConfig(r=r, lora_alpha=3 * r, target_modules=["up", "down"], **kw))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0, where B's gradient would be the only nonzero one
            nn.init.normal_(p, std=0.3)
    return model


def _grads(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_outputs_and_gradients_as_peft():
    x = torch.randn(3, 5, 12)
    model = _lora(TwoLinear())
    ref_out, ref_gx, ref_g = _grads(model, x)
    assert fused_lora.install(model) == 2
    before = fused_lora.calls
    out, gx, g = _grads(model, x)
    assert fused_lora.calls - before == 2  # both layers ran fused
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
    assert set(g) == set(ref_g) and len(g) == 4  # lora_A and lora_B of both layers, nothing else
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-5, atol=1e-6)
    assert fused_lora.uninstall(model) == 2
    before = fused_lora.calls
    _grads(model, x)
    assert fused_lora.calls == before


def test_gradients_match_on_a_causal_lm_loaded_by_load_model():
    tok = load_tokenizer("tiny")
    cfg = ModelConfig(lora=True, lora_r=4, tiny_hidden=32, tiny_layers=2)
    fused = load_model(cfg, tok)
    plain = load_model(ModelConfig(**{**cfg.__dict__, "fused_lora": False}), tok)
    for m in (fused, plain):
        torch.manual_seed(1)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.1)
    results = []
    for m in (fused, plain):
        m.zero_grad()
        before = fused_lora.calls
        logits = m(input_ids=IDS).logits
        torch.log_softmax(logits, -1)[..., 3].sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad},
                        fused_lora.calls - before))
    (lf, gf, nf), (lp, gp, np_) = results
    assert nf > 0 and np_ == 0
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-5)
    for name in gp:
        torch.testing.assert_close(gf[name], gp[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["disabled", "merged", "dropout", "trainable_base", "autocast", "two_adapters"])
def test_falls_back_to_peft_where_it_cannot_prove_equality(case):
    x = torch.randn(2, 12)
    model = _lora(TwoLinear(), lora_dropout=0.5 if case == "dropout" else 0.0)
    model.eval()  # dropout off, so both paths can be compared even there
    if case == "trainable_base":
        for layer in (model.base_model.model.up, model.base_model.model.down):
            layer.base_layer.weight.requires_grad_(True)  # full fine-tuning beside the adapter
    if case == "two_adapters":
        model.add_adapter("other", LoraConfig(r=2, target_modules=["up", "down"]))
        model.base_model.set_adapter(["default", "other"])
    expected = model(x).detach()
    with model.disable_adapter():
        base_out = model(x).detach()
    fused_lora.install(model)
    before = fused_lora.calls
    if case == "disabled":
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base_out)  # the adapter-off KL reference is untouched
    elif case == "merged":
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    else:
        torch.testing.assert_close(model(x), expected)
    assert fused_lora.calls == before


def test_deepcopy_keeps_each_copy_on_its_own_weights():
    x = torch.randn(2, 12)
    model = _lora(TwoLinear())
    fused_lora.install(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if "lora_B" in name:
                p.zero_()
    with model.disable_adapter():
        base_out = model(x)
    torch.testing.assert_close(clone(x), base_out)  # the copy's forward reads the copy's zeroed B
    assert not torch.allclose(model(x), base_out)
