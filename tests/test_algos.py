"""rl.algos: hand-computed cases, invariants, vectorised-vs-loop equivalence."""

import math

import pytest
import torch

from rl import algos

# One trajectory, T=6: tokens 1,2 are step 0 (ends at 2), token 4 is step 1 (ends at 4); tokens
# 0, 3, 5 are observation/template tokens whose values must not matter.
def close(got, expected, atol=1e-5):
    return torch.allclose(got.float(), torch.tensor(expected, dtype=torch.float), atol=atol)


MASK = torch.tensor([[0, 1, 1, 0, 1, 0]])
ENDS = torch.tensor([[2, 4]])
VALUES = torch.tensor([[9.0, 0.5, 0.6, -7.0, 0.8, 3.0]])
STEP_R = torch.tensor([[0.2, 1.0]])


def loop_gae(rewards, values, mask, gamma, lam):
    """Reference: per row, collect action tokens, plain GAE over them, put back."""
    adv = torch.zeros_like(values)
    for b in range(values.shape[0]):
        idx = [t for t in range(values.shape[1]) if mask[b, t]]
        last = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            nv = values[b, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            delta = rewards[b, t].item() + gamma * nv - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv


def test_scatter_gather_roundtrip_and_ragged_lists():
    tok = algos.scatter_step_values([[0.2, 1.0], [3.0]], [[2, 4], [1]], T=6)
    assert tok.tolist() == [pytest.approx([0, 0, 0.2, 0, 1.0, 0]), [0, 3.0, 0, 0, 0, 0]]
    back = algos.gather_at_step_ends(tok, [[2, 4], [1]])
    assert back.tolist() == [pytest.approx([0.2, 1.0]), [3.0, 0.0]]
    with pytest.raises(ValueError, match="differ"):
        algos.scatter_step_values(torch.zeros(1, 3), ENDS, 6)


def test_step_index_starts_and_broadcast():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]])
    ends = torch.tensor([[2, 4], [0, -1]])
    assert algos.token_step_index(mask, ends).tolist() == [[-1, 0, 0, -1, 1, -1], [0, -1, -1, -1, -1, -1]]
    assert algos.step_starts(mask, ends).tolist() == [[1, 4], [0, -1]]
    got = algos.broadcast_step_values(torch.tensor([[5.0, 7.0], [2.0, 0.0]]), mask, ends)
    assert got.tolist() == [[0, 5, 5, 0, 7, 0], [2, 0, 0, 0, 0, 0]]


def test_gae_token_level_hand_computed():
    adv, ret = algos.gae_token_level(STEP_R, VALUES, MASK, ENDS, torch.zeros(1), gamma=0.9, lam=0.8)
    # t=4: 1.0 - 0.8 = 0.2;  t=2: 0.2 + 0.9*0.8 - 0.6 = 0.32 -> 0.32 + 0.72*0.2 = 0.464
    # t=1: 0 + 0.9*0.6 - 0.5 = 0.04 -> 0.04 + 0.72*0.464 = 0.37408
    expected = [0, 0.37408, 0.464, 0, 0.2, 0]
    assert adv[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0, 0.87408, 1.064, 0, 1.0, 0], abs=1e-6)


def test_gae_turn_level_hand_computed():
    adv, ret = algos.gae_turn_level(STEP_R, VALUES, MASK, ENDS, torch.zeros(1), gamma=0.9, lam=0.8)
    # step values read at first action tokens: V0 = values[1] = 0.5, V1 = values[4] = 0.8
    # A1 = 1.0 - 0.8 = 0.2; A0 = 0.2 + 0.9*0.8 - 0.5 + 0.72*0.2 = 0.564
    assert adv[0].tolist() == pytest.approx([0, 0.564, 0.564, 0, 0.2, 0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0, 1.064, 1.064, 0, 1.0, 0], abs=1e-6)


def test_gae_gamma_lambda_one_is_return_to_go_minus_values():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 20
    mask = (torch.rand(B, T, generator=g) > 0.4).long()
    values = torch.randn(B, T, generator=g)
    rewards = torch.randn(B, T, generator=g) * mask
    adv, ret = algos.gae_tokens(rewards, values, mask, 1.0, 1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)  # sum of rewards at or after t
    assert torch.allclose(adv, (to_go - values) * mask, atol=1e-5)
    assert torch.allclose(ret, to_go * mask, atol=1e-5)


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 0.9), (0.5, 0.0)])
def test_gae_vectorised_matches_loop(gamma, lam):
    g = torch.Generator().manual_seed(1)
    B, T = 5, 30
    mask = (torch.rand(B, T, generator=g) > 0.5).long()
    values = torch.randn(B, T, generator=g)
    rewards = torch.randn(B, T, generator=g) * mask
    adv, _ = algos.gae_tokens(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, loop_gae(rewards, values, mask, gamma, lam), atol=1e-5)


def test_group_normalized_and_rloo_hand_computed():
    adv = algos.group_normalized(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 7, 7]))
    assert adv.tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2), 0, 0], abs=1e-5)
    loo = algos.leave_one_out(torch.tensor([1.0, 0.0, 0.5, 2.0]), torch.tensor([0, 0, 0, 1]))
    assert loo.tolist() == pytest.approx([0.75, -0.75, 0.0, 0.0])
    # RLOO = k/(k-1) * (R - group mean)
    r = torch.tensor([3.0, 1.0, 2.0, 6.0])
    assert torch.allclose(algos.leave_one_out(r, torch.zeros(4, dtype=torch.long)), 4 / 3 * (r - r.mean()))


def test_grpo_and_rloo_estimators_broadcast_over_action_tokens_only():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0]])
    ends = torch.tensor([[2, 4], [1, -1]])
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    gids = torch.tensor([0, 0])
    adv, ret = algos.ADVANTAGE_ESTIMATORS["grpo"](rewards, torch.zeros(2, 6), mask, ends, gids, 1.0, 1.0)
    a = 1 / math.sqrt(2)
    assert close(adv, [[0, a, a, 0, a, 0], [0, -a, 0, 0, 0, 0]])
    assert ret.abs().sum() == 0
    adv, _ = algos.ADVANTAGE_ESTIMATORS["rloo"](rewards, torch.zeros(2, 6), mask, ends, gids, 1.0, 1.0)
    assert adv.tolist() == [[0, 1, 1, 0, 1, 0], [0, -1, 0, 0, 0, 0]]


def test_grpo_step_level_hand_computed():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0], [0, 1, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0]])
    ends = torch.tensor([[2, 4], [1, -1], [1, 3], [1, -1]])
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    gids = torch.tensor([3, 3, 3, 7])  # the last rollout is alone in its group: advantage 0
    # gamma 0.5 returns-to-go: [1, 0], [0], [0.5, 1]; turn-0 mean 0.5, turn-1 mean 0.5;
    # all five returns 1, 0, 0, 0.5, 1: mean 0.5, unbiased std 0.5
    adv, ret = algos.grpo_step_level(rewards, torch.zeros(4, 6), mask, ends, gids, 0.5, 1.0)
    assert close(adv, [[0, 1, 1, 0, -1, 0], [0, -1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0] * 6])
    assert ret.abs().sum() == 0


def test_grpo_step_level_has_no_net_push_when_most_step_rewards_are_zero():
    # SPA-like credit: a few progress steps, many ~0 steps, failed rollouts longer
    torch.manual_seed(0)
    B, S = 8, 12
    lengths = [6, 7, 12, 12, 5, 12, 12, 8]
    ends = torch.full((B, S), -1)
    rewards = torch.zeros(B, S)
    for i, n in enumerate(lengths):
        ends[i, :n] = torch.arange(n) * 2 + 1
        rewards[i, :n] = 0.01 * torch.randn(n)
        if n < 12:
            rewards[i, n // 2] += 0.5
            rewards[i, n - 1] += 0.5
    mask = torch.zeros(B, 2 * S, dtype=torch.long)
    mask[:, 1::2] = (ends >= 0).long()
    adv, _ = algos.grpo_step_level(rewards, torch.zeros(B, 2 * S), mask, ends, torch.tensor([0] * 4 + [1] * 4), 1.0, 1.0)
    step_adv = adv[:, 1::2][ends >= 0]
    assert abs(float(step_adv.mean())) < 1e-5
    assert float(adv[:2].sum()) > 0 > float(adv[2:4].sum())  # the successes are pushed up


def test_registry_shares_one_signature():
    mask, ends = MASK, ENDS
    for name, fn in algos.ADVANTAGE_ESTIMATORS.items():
        adv, ret = fn(STEP_R, VALUES, mask, ends, torch.zeros(1, dtype=torch.long), 0.9, 0.8)
        assert adv.shape == ret.shape == VALUES.shape, name
        assert (adv * (1 - mask)).abs().sum() == 0, f"{name} puts advantage on observation tokens"


def test_ppo_policy_loss_hand_computed():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    loss, clip_frac, approx_kl = algos.ppo_policy_loss(logp, old, adv, torch.ones(1, 3), clip_eps=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: 2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.0) / 3)
    assert clip_frac.item() == pytest.approx(1 / 3)
    assert approx_kl.item() == pytest.approx((0.5 - math.log(1.5) - 0.5 - math.log(0.5)) / 3, abs=1e-6)


def test_observation_tokens_get_zero_loss_and_gradient():
    logp = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 1, 0]])
    adv = torch.randn(2, 5) * 10
    loss, _, _ = algos.ppo_policy_loss(logp, logp.detach() - 0.05, adv, mask, 0.2)
    loss.backward()
    assert (logp.grad * (1 - mask)).abs().sum() == 0
    assert (logp.grad * mask).abs().sum() > 0
    # changing the advantages of observation tokens does not change the loss
    adv2 = adv + (1 - mask) * 100
    loss2, _, _ = algos.ppo_policy_loss(logp, logp.detach() - 0.05, adv2, mask, 0.2)
    assert loss2.item() == pytest.approx(loss.item())


def test_sharded_losses_with_global_normalizer_sum_to_global_mean():
    g = torch.Generator().manual_seed(2)
    logp, old, adv = (torch.randn(6, 8, generator=g) for _ in range(3))
    mask = (torch.rand(6, 8, generator=g) > 0.3).long()
    full, _, _ = algos.ppo_policy_loss(logp, old, adv, mask, 0.2)
    n = mask.sum().float()
    parts = [algos.ppo_policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], 0.2, n)[0]
             for i in range(0, 6, 2)]
    assert sum(parts).item() == pytest.approx(full.item(), abs=1e-6)


def test_value_loss_hand_computed():
    loss, frac = algos.value_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]),
                                  torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.5) and frac.item() == 0.0
    loss, frac = algos.value_loss(torch.tensor([[0.2]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]),
                                  torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.64) and frac.item() == 1.0
    loss, _ = algos.value_loss(torch.tensor([[0.2]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]),
                               torch.ones(1, 1), clip=None)
    assert loss.item() == pytest.approx(0.5 * 0.04)


def test_kl_estimators_entropy_and_logprobs():
    logp, ref = torch.tensor([0.0]), torch.tensor([math.log(0.5)])
    assert algos.kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert algos.kl_k3(logp, ref).item() == pytest.approx(0.5 + math.log(0.5) * -1 - 1, abs=1e-6)
    assert algos.kl_k3(ref, ref).item() == 0.0
    # a token the policy finds 20 nats less likely than the reference: capped, and no gradient through it
    far = torch.tensor([-25.0, -1.0], requires_grad=True)
    k3 = algos.kl_k3(far, torch.tensor([-5.0, -1.5]))
    assert k3[0].item() == algos.K3_MAX and k3[1].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1, abs=1e-6)
    k3.sum().backward()
    assert far.grad[0].item() == 0.0 and far.grad[1].item() == pytest.approx(1 - math.exp(-0.5), abs=1e-6)
    assert algos.entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # p(token 2 | first token) = 3/6
    ids = torch.tensor([[1, 2, 0]])
    assert close(algos.token_logprobs(logits, ids), [[0.0, math.log(0.5), math.log(0.25)]])


def test_whitening_and_explained_variance():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    w = algos.masked_whiten(x, mask)
    assert w.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    r = torch.tensor([1.0, 2.0, 3.0])
    assert algos.explained_variance(r, r, torch.ones(3)) == pytest.approx(1.0)
    assert algos.explained_variance(torch.zeros(3), r, torch.ones(3)) == pytest.approx(0.0)


def test_given_step_advantages_are_broadcast_unchanged():
    """credit.mode=gigpo hands the trainer advantages: each action token of step s gets A_s."""
    step_adv = torch.tensor([[0.5, -1.0], [2.0, 7.0]])  # row 1 has one real step; 7.0 is padding
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 1, 0, 0, 0]])
    adv, ret = algos.ADVANTAGE_ESTIMATORS["given"](step_adv, torch.zeros(2, 5), mask, [[2, 4], [1]],
                                                   torch.tensor([0, 0]), 0.9, 0.5)
    assert adv.tolist() == [[0.0, 0.5, 0.5, 0.0, -1.0], [0.0, 2.0, 0.0, 0.0, 0.0]]
    assert "given" in algos.CRITIC_FREE and not ret.any()


@pytest.mark.parametrize("chunk", [1, 3, 512])
def test_selected_logprobs_equal_the_full_log_softmax_and_its_gradients(chunk):
    """Log-probs and entropies from hidden states at the chosen positions equal those of the full
    (B, T, V) logits to 1e-5, with the same gradients w.r.t. the hidden states and the head."""
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 7, 5, 11
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    bias = torch.randn(V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    pos = torch.rand(B, T, generator=g) < 0.5
    pos[0, 0] = True  # position 0 has no prediction: must come out 0
    temp = 0.7

    logp, ent = algos.selected_token_logprobs(hidden, weight, ids, pos, temp, bias, chunk=chunk)
    logits = (hidden @ weight.T + bias) / temp
    ref = algos.token_logprobs(logits, ids)
    ref_ent = torch.nn.functional.pad(algos.entropy_from_logits(logits[:, :-1]), (1, 0))
    m = pos.clone()
    m[:, 0] = False
    assert torch.allclose(logp[m], ref[m], atol=1e-5) and torch.allclose(ent[m], ref_ent[m], atol=1e-5)
    assert not logp[~m].any() and not ent[~m].any()

    w = torch.randn(B, T, generator=g)
    got = torch.autograd.grad((logp * w).sum() + (ent * w).sum(), (hidden, weight))
    want = torch.autograd.grad((ref * w * m).sum() + (ref_ent * w * m).sum(), (hidden, weight))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_head_backward_equals_autograd_through_the_ops(softcap, with_entropy):
    """The hand-written backward of the chunked head (`_HeadLogprobs`) gives the gradients that
    autograd gives through `_head_logprobs`' own ops, for the hidden states, the head's weight and
    bias, with a softcap, at a temperature, and with or without an entropy term in the loss."""
    g = torch.Generator().manual_seed(1)
    K, H, V = 6, 5, 13
    h = torch.randn(K, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    bias = torch.randn(V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (K,), generator=g)
    w_logp, w_ent = torch.randn(K, generator=g), torch.randn(K, generator=g)

    def loss(fn):
        lp, en = fn(h, targets, weight, bias, 0.7, softcap)
        return (lp * w_logp).sum() + ((en * w_ent).sum() if with_entropy else 0)

    got = torch.autograd.grad(loss(algos._HeadLogprobs.apply), (h, weight, bias))
    want = torch.autograd.grad(loss(algos._head_logprobs), (h, weight, bias))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    lp, en = algos._HeadLogprobs.apply(h, targets, weight, bias, 0.7, softcap)
    ref_lp, ref_en = algos._head_logprobs(h, targets, weight, bias, 0.7, softcap)
    assert torch.allclose(lp, ref_lp, atol=1e-6) and torch.allclose(en, ref_en, atol=1e-6)


def test_selected_logprobs_softcap_and_no_positions():
    hidden, weight = torch.randn(1, 4, 3), torch.randn(6, 3)
    ids = torch.tensor([[0, 1, 2, 3]])
    pos = torch.tensor([[0, 1, 1, 1]])
    logp, _ = algos.selected_token_logprobs(hidden, weight, ids, pos, softcap=2.0)
    z = hidden @ weight.T
    assert torch.allclose(logp, algos.token_logprobs(2.0 * torch.tanh(z / 2.0), ids), atol=1e-6)
    logp, ent = algos.selected_token_logprobs(hidden, weight, ids, torch.zeros(1, 4))
    assert logp.shape == (1, 4) and not logp.any() and not ent.any()
