"""rl.credit.online: the estimator refits every K calls on the buffered RL batches, the credit of
the refit call already comes from the refit weights, and the refit lowers the SPA loss."""

import pytest
import torch

from rl.credit import ProgressConfig, ProgressEstimator, predict_progress
from rl.credit.online import OnlineProgress
from rl.models import load_tokenizer, tiny_model
from rl.trajectory import Step, Trajectory


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def batch(start):
    """Won episodes take the key then open the door (R = 1); lost ones walk about (R = 0)."""
    out = []
    for i in range(4):
        won = i % 2 == 0
        acts = ["take key", "open door"] if won else ["go north", "go south"]
        steps = [Step("The key is here.", a, True, info={"progress": 0.5 * (k + 1) if won else 0.0})
                 for k, a in enumerate(acts)]
        out.append(Trajectory(start + i, "t", steps, 1.0 if won else 0.0, won, system_prompt="Open the door.",
                              final_observation="You opened the door. You won." if won else "You walk south."))
    return out


def weights(est):
    return torch.cat([p.detach().flatten().clone() for p in est.parameters()])


def test_refits_every_k_calls_and_the_credit_reflects_it(tok):
    est = ProgressEstimator(tiny_model(tok, seed=3), read_at="observation").eval()
    cfg = ProgressConfig(lr=1e-3, head_lr=1e-2, batch_size=4, refit_every=2, refit_buffer=6, refit_epochs=8, seed=0)
    logged = []
    online = OnlineProgress(est, tok, cfg, log_fn=lambda m, s: logged.append((s, m)))
    before = weights(est)
    b1 = batch(0)
    online(b1)  # call 1: buffered and annotated, no refit
    assert torch.equal(weights(est), before) and online.refits == 0
    assert b1[0].annotations["progress"] == [0.0, 0.0]  # the head starts at zero
    assert len(online.buffer) == 4 and "progress/refit" not in str(logged)
    b2 = batch(4)
    probe = batch(100)
    loss_before = sum((sum(c) - t.outcome) ** 2 for c, t in zip(predict_progress(est, tok, probe), probe))
    online(b2)  # call 2: refit on the buffer (capped at 6: the newest trajectories), then annotate
    assert online.refits == 1 and len(online.buffer) == 6
    assert [t.traj_id for t in online.buffer] == [2, 3, 4, 5, 6, 7]
    assert not torch.equal(weights(est), before)
    # b2's credit is the refit estimator's, and it moved towards the outcomes
    assert [t.annotations["progress"] for t in b2] == [pytest.approx(c, abs=1e-6) for c in predict_progress(est, tok, b2)]
    loss_after = sum((sum(c) - t.outcome) ** 2 for c, t in zip(predict_progress(est, tok, probe), probe))
    assert loss_after < 0.5 * loss_before
    step, metrics = logged[-1]
    assert step == 2 and metrics["progress_online/buffer"] == 6 and metrics["progress_online/refit_loss"] >= 0
    assert metrics["progress_online/faithful_steps"] == 8  # the batch's credit scored against true progress
    # the buffer holds copies: the trainer's later writes to the batch do not reach it
    b2[0].annotations["progress"] = [9.0, 9.0]
    assert online.buffer[2].annotations.get("progress") != [9.0, 9.0]
    frozen = weights(est)
    online(batch(8))  # call 3: no refit
    assert torch.equal(weights(est), frozen) and online.refits == 1


def test_refit_every_is_validated():
    with pytest.raises(ValueError, match="progress.refit_every=-1"):
        ProgressConfig(refit_every=-1).validate()
    with pytest.raises(ValueError, match="OnlineProgress needs >= 1"):
        OnlineProgress(ProgressEstimator(tiny_model(load_tokenizer("tiny"))), load_tokenizer("tiny"), ProgressConfig())


def test_refit_micro_batches_equal_whole_batches(tok):
    """Online refits accumulate progress.micro_batch_size micro-batches into each batch's mean
    gradient: with plain SGD (linear in the gradient) the refit weights are the same."""
    from rl.credit.online import refit_epochs
    from rl.credit.progress import _item, _pad_id
    from rl.credit.readout import read_view

    trajs = batch(0) + batch(4)[:3]  # 7 trajectories: batches of 4 and 3
    items = [_item(read_view(tok, t, "action", 512), t) for t in trajs]
    out = {}
    for micro in (0, 2, 1):
        est = ProgressEstimator(tiny_model(tok, seed=0))
        opt = torch.optim.SGD(est.parameters(), lr=0.02)
        loss = refit_epochs(est, opt, items, _pad_id(tok), epochs=2, batch_size=4, seed=0, grad_clip=0.0,
                            micro_batch_size=micro)
        out[micro] = (weights(est), loss)
    assert (out[0][0] - weights(ProgressEstimator(tiny_model(tok, seed=0)))).abs().max() > 1e-4  # it moved
    for micro in (2, 1):
        torch.testing.assert_close(out[micro][0], out[0][0], rtol=1e-3, atol=5e-5)
        assert out[micro][1] == pytest.approx(out[0][1], rel=1e-5)
