"""Rows sharing a prompt prefix (a task's group) encode it once in scoring and the update: the
log-probs, entropies, values and every gradient equal those of the full forward of each row."""

import pytest
import torch

from rl.models import ModelConfig, load_model, tiny_model
from rl.trainers.scoring import PolicyWithValue, build_batch, count_decoder_tokens, decoder_hidden
from rl.trajectory import Step, Trajectory

SYSTEM = "Find the key. Reply with one action."


def group(gid, first_obs, actions_per_traj):
    out = []
    for k, actions in enumerate(actions_per_traj):
        steps = [Step(first_obs if t == 0 else f"You did {a_prev}. Room {gid}{t}.", a, True)
                 for t, (a_prev, a) in enumerate(zip([""] + actions[:-1], actions))]
        out.append(Trajectory(gid * 10 + k, f"t{gid}", steps, 1.0, True, group_id=gid, system_prompt=SYSTEM,
                              final_observation="End."))
    return out


def batch(tok):
    trajs = (group(0, "The key is 2 steps north.", [["go north", "go north", "take key"], ["go south"]])
             + group(1, "The key is here.", [["take key"], ["go east", "take key"], ["drop key", "take key"]])
             + group(2, "A lone episode in its own group.", [["go west"]]))
    return trajs, build_batch(tok, trajs, [[0.0] * t.num_steps for t in trajs], 512)


def full_hidden(decoder, ids, attn):
    return decoder(input_ids=ids, attention_mask=attn).last_hidden_state


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prefix_forward_and_gradients_equal_the_full_forward(tok, lora):
    trajs, b = batch(tok)
    lengths = b.attention_mask.sum(1)
    first = b.action_mask.float().argmax(1)
    prefixes = [tuple(b.input_ids[i, : first[i]].tolist()) for i in range(len(trajs))]
    assert len(set(prefixes)) == 3 and len(prefixes) == 6  # three groups share their prefixes

    def run(shared: bool):
        torch.manual_seed(0)
        if lora:
            policy = load_model(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=2, tiny_heads=2, lora=True,
                                            lora_r=4, seed=1), tok)
        else:
            policy = tiny_model(tok, hidden=32, layers=2, heads=2, seed=1)
        model = PolicyWithValue(policy, "shared")
        torch.nn.init.normal_(model.value_head.weight, std=0.5, generator=torch.Generator().manual_seed(1))
        if not shared:
            import rl.trainers.scoring as scoring

            scoring_decoder = scoring.decoder_hidden
            scoring.decoder_hidden = lambda dec, ids, attn, pos: full_hidden(dec, ids, attn)
        try:
            logp, ent, values = model(b.input_ids, b.attention_mask, b.action_mask, 0.7)
        finally:
            if not shared:
                scoring.decoder_hidden = scoring_decoder
        real = b.attention_mask.bool()
        loss = (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum() + ent.sum() \
            + (values * real).pow(2).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logp.detach(), ent.detach(), (values * real).detach(), grads

    got, want = run(True), run(False)
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    assert got[0].abs().sum() > 1 and set(got[3]) == set(want[3]) and len(got[3]) > 3
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], atol=2e-5, rtol=1e-3, msg=name)
    assert max(w.abs().max().item() for w in want[3].values()) > 1e-2
    assert int(lengths.max()) > int(first.max())


def test_the_prefix_runs_once_per_group(tok):
    trajs, b = batch(tok)
    decoder = tiny_model(tok, hidden=32, layers=2, heads=2, seed=1).get_decoder()
    fed = []
    hook = decoder.register_forward_pre_hook(lambda m, a, kw: fed.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    with torch.no_grad(), count_decoder_tokens() as run:
        got = decoder_hidden(decoder, b.input_ids, b.attention_mask, b.action_mask)
    hook.remove()
    first = b.action_mask.float().argmax(1)
    lengths = b.attention_mask.sum(1)
    # one pass over the 3 distinct prefixes, one over the 6 rows' remaining tokens
    assert fed == [(3, int(first.max())), (6, int((lengths - first).max()))]
    # the tokens counted are those run: each distinct prefix once, every row's rest
    prefixes = {tuple(b.input_ids[i, : first[i]].tolist()) for i in range(len(trajs))}
    assert run[0] == sum(map(len, prefixes)) + int((lengths - first).sum()) < int(lengths.sum())
    one = torch.tensor([0, 2, 5])  # the first row of each group (2, 3 and 1 rows): nothing shared
    assert len({tuple(b.input_ids[i, : first[i]].tolist()) for i in one.tolist()}) == 3
    with torch.no_grad(), count_decoder_tokens() as alone:
        decoder_hidden(decoder, b.input_ids[one], b.attention_mask[one], b.action_mask[one])
    assert alone[0] == int(lengths[one].sum())
    decoder.gradient_checkpointing = True  # no KV cache under checkpointing: the full forward, counted so
    with torch.no_grad(), count_decoder_tokens() as full:
        decoder_hidden(decoder, b.input_ids, b.attention_mask, b.action_mask)
    decoder.gradient_checkpointing = False
    assert full[0] == int(lengths.sum())
    with torch.no_grad():
        want = full_hidden(decoder, b.input_ids, b.attention_mask)
    real = b.attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)


def test_minibatches_hold_whole_groups_and_micro_batches_keep_them_together():
    from rl.trainers.scoring import group_major_order, group_permutation

    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    perms = [group_permutation(g, torch.Generator().manual_seed(s)) for s in range(5)]
    for p in perms:
        assert sorted(p.tolist()) == list(range(12))
        for start in range(0, 12, 4):  # minibatches of one group size hold one whole group
            assert len(set(g[p[start:start + 4]].tolist())) == 1
    assert len({tuple(p.tolist()) for p in perms}) == 5  # still random
    lengths = torch.tensor([5, 9, 7, 3, 12, 4, 4, 1, 6, 6, 2, 8])
    order = group_major_order(torch.tensor([0, 1, 2, 4, 5, 6, 8, 11]), lengths, g)
    # group 1 (longest row 12) first, then group 0 (9), then group 2 (8); longest first inside
    assert order.tolist() == [4, 5, 6, 1, 2, 0, 11, 8]
