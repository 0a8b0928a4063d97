"""Multi-turn PPO/GRPO/RLOO trainer on a toy two-turn task, tracking and checkpoints."""

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))
import toy_letters as toy  # noqa: E402

from rl import algos  # noqa: E402
from rl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from rl.models import tiny_model  # noqa: E402
from rl.tracking import Tracker, read_metrics  # noqa: E402
from rl.trainers import ppo, scoring  # noqa: E402
from rl.trainers.ppo import PPOConfig, build_batch, train_rl  # noqa: E402
from rl.trajectory import Step, Trajectory  # noqa: E402

TASKS = [f"train-{i}" for i in range(16)]
TIMING = {"tokens_per_s", "rollout_time", "score_time", "update_time"}




@pytest.fixture(scope="module")
def warm_model(tok):
    model = tiny_model(tok, seed=0)
    toy.warm_start(model, tok, steps=40, lr=1e-2)
    return model


def run(cfg, model, tok, run_dir, credit=toy.step_rewards_correct, resume=False, eval_n=32, ref_model=None):
    acc = Accelerator(cpu=True)
    tracker = Tracker(run_dir, acc)
    try:
        out = train_rl(cfg, model, tok, toy.make_rollout_fn(tok, cfg.group_size), credit,
                       toy.make_eval_fn(tok, n=eval_n), run_dir, acc, tracker, resume=resume,
                       ref_model=ref_model, tasks=TASKS)
    finally:
        tracker.close()
    return out, read_metrics(run_dir)


def small_cfg(**kw):
    base = dict(iterations=8, tasks_per_iter=4, group_size=4, ppo_epochs=2, minibatch_size=8, lr=2e-3,
                eval_every=8, save_every=100, gamma=1.0, lam=1.0)
    return PPOConfig(**{**base, **kw})


def test_ppo_improves_success_on_toy_multiturn_task(warm_model, tok, tmp_path):
    _, rows = run(small_cfg(), copy.deepcopy(warm_model), tok, tmp_path)
    evals = [r for r in rows if r["stage"] == "eval"]
    assert [r["step"] for r in evals] == [0, 8]
    assert evals[0]["eval/success_rate"] <= 0.3  # ~1/16 for a uniform policy over 4 letters, 2 turns
    assert evals[-1]["eval/success_rate"] >= evals[0]["eval/success_rate"] + 0.3
    rl_rows = [r for r in rows if r["stage"] == "rl"]
    assert len(rl_rows) == 8 and all(r["failed_episodes"] == 0 for r in rl_rows)
    for key in ("reward", "success", "outcome", "entropy", "clip_frac", "value_loss", "explained_var",
                "tokens_per_s", "rollout_time", "update_time", "kl_ref", "approx_kl", "grad_norm"):
        assert key in rl_rows[0], key
    assert rl_rows[-1]["entropy"] < rl_rows[0]["entropy"]
    # every episode has 2 steps and a won one replied "A" twice (valid): valid share >= success
    assert all(r["success"] <= r["grounding_accuracy"] <= 1.0 for r in rl_rows)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_8"


@pytest.mark.slow
# turn-level GRPO at lr 2e-3 reached 0.81 sampled success at iteration 4 of seed 0 on an AMD EPYC
# host, then one update blew the policy up (entropy 0.38 -> 1.77, above ln 4: non-letter tokens) and
# it ended at 0.22; at 1e-3 seeds 0-4 all end at 0.97 there (seeds 1-4 end at 0.97-1.0 at 2e-3 too)
@pytest.mark.parametrize("algo,level,lr", [("grpo", "token", 2e-3), ("rloo", "token", 2e-3), ("ppo", "turn", 2e-3),
                                           ("grpo", "turn", 1e-3)])
def test_critic_free_and_turn_level_variants_improve(warm_model, tok, tmp_path, algo, level, lr):
    credit = toy.terminal_rewards if level == "token" and algo != "ppo" else toy.step_rewards_correct
    _, rows = run(small_cfg(algo=algo, advantage_level=level, kl_coef=0.01, lr=lr), copy.deepcopy(warm_model),
                  tok, tmp_path, credit=credit)
    evals = [r for r in rows if r["stage"] == "eval"]
    assert evals[-1]["eval/success_rate"] >= evals[0]["eval/success_rate"] + 0.3, (algo, level, evals)


def test_resume_reproduces_uninterrupted_metrics(warm_model, tok, tmp_path):
    cfg = small_cfg(iterations=3, save_every=1, eval_every=0, eval_at_start=False)
    _, full = run(cfg, copy.deepcopy(warm_model), tok, tmp_path / "full", eval_n=8)
    _, first = run(small_cfg(iterations=2, save_every=1, eval_every=0, eval_at_start=False),
                   copy.deepcopy(warm_model), tok, tmp_path / "cut", eval_n=8)
    # the attempt was killed after logging an iteration it had not checkpointed: the resumed run
    # logs step 3 again, and read_metrics keeps only that later row
    rl_rows = [r for r in first if r["stage"] == "rl"]
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**rl_rows[-1], "step": 3, "policy_loss": 1e9}) + "\n")
    # a different starting model: everything must come from the checkpoint
    _, resumed = run(cfg, tiny_model(tok, seed=5), tok, tmp_path / "cut", resume=True, eval_n=8)
    rl_full = [r for r in full if r["stage"] == "rl"]
    rl_resumed = [r for r in resumed if r["stage"] == "rl"]
    assert [r["step"] for r in rl_resumed] == [1, 2, 3]  # the appended metrics.jsonl continues
    for a, b in zip(rl_full, rl_resumed):
        for key in a:
            if key not in TIMING and not key.endswith(("_time", "_peak_rss_gib")):
                assert a[key] == pytest.approx(b[key], abs=1e-6, nan_ok=True), (a["step"], key)
    assert len(first) == 2 + 1  # two rl rows + final eval


def test_lora_reference_is_the_base_model_without_a_copy(tok, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(tok, seed=1)
    base_copy = copy.deepcopy(base)  # the test's own reference, made before the trainer runs
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # make the policy differ from the base (LoRA B starts at zero)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    n_params = sum(p.numel() for p in policy.parameters())

    acc = Accelerator(cpu=True)
    wrapped = acc.prepare(ppo.PolicyWithValue(policy, None))
    traj = Trajectory(0, "t", [Step("Pick a letter.", "A", True), Step("Pick a letter.", "B", True)], 0.5,
                      False, system_prompt="Reply with one letter.")
    batch = build_batch(tok, [traj, traj], [[0.0, 1.0], [0.0, 1.0]], 512)
    logp, _, ref = ppo._score(acc, wrapped, None, batch, 1, want_values=False, want_ref=True)
    with torch.no_grad():
        expected = algos.token_logprobs(base_copy(input_ids=batch.input_ids).logits, batch.input_ids)
    m = batch.action_mask.bool()
    assert torch.allclose(ref[m], expected[m], atol=1e-5)
    assert not torch.allclose(logp[m], expected[m], atol=1e-3)  # the adapter is back on afterwards

    real_deepcopy = copy.deepcopy

    def no_copy(obj, *a, **k):
        if isinstance(obj, torch.nn.Module):
            raise AssertionError("the trainer copied the model")
        return real_deepcopy(obj, *a, **k)

    monkeypatch.setattr(ppo.copy, "deepcopy", no_copy)
    _, rows = run(small_cfg(algo="grpo", iterations=1, kl_coef=0.1), policy, tok, tmp_path, eval_n=4)
    assert sum(p.numel() for p in policy.parameters()) == n_params
    assert rows[1]["kl_ref"] > 0  # a real reference: the adapter moved the policy away from it


def test_log_probs_are_taken_at_the_sampling_temperature(warm_model, tok):
    acc = Accelerator(cpu=True)
    model = copy.deepcopy(warm_model)
    wrapped = acc.prepare(ppo.PolicyWithValue(model, None))
    traj = Trajectory(0, "t", [Step("Pick a letter.", "A", True), Step("Pick a letter.", "C", True)], 0.5,
                      False, system_prompt="Reply with one letter.")
    batch = build_batch(tok, [traj], [[0.0, 1.0]], 512)
    logp, _, ref = ppo._score(acc, wrapped, copy.deepcopy(model), batch, 1, want_values=False, want_ref=True,
                              temperature=0.5)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits
    m = batch.action_mask.bool()
    expected = algos.token_logprobs(logits / 0.5, batch.input_ids)
    assert torch.allclose(logp[m], expected[m], atol=1e-5) and torch.allclose(ref[m], expected[m], atol=1e-5)
    assert not torch.allclose(logp[m], algos.token_logprobs(logits, batch.input_ids)[m], atol=1e-3)


def test_train_rl_rejects_greedy_rollouts(tok, tmp_path):
    with pytest.raises(ValueError, match="temperature 0.0 must be > 0"):
        train_rl(small_cfg(), tiny_model(tok), tok, None, None, None, tmp_path, Accelerator(cpu=True), None,
                 tasks=TASKS, temperature=0.0)


def test_keep_best_returns_the_policy_with_the_best_evaluation(warm_model, tok, tmp_path):
    scores, seen = iter([0.5, 0.9, 0.1, 0.9]), {}

    def eval_fn(policy):  # scripted scores; remembers the weights it was shown
        seen[len(seen)] = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        return {"eval/success_rate": next(scores)}

    cfg = small_cfg(algo="grpo", iterations=3, eval_every=1, keep_best=True)
    acc = Accelerator(cpu=True)
    tracker = Tracker(tmp_path, acc)
    try:
        out = train_rl(cfg, copy.deepcopy(warm_model), tok, toy.make_rollout_fn(tok, cfg.group_size),
                       toy.step_rewards_correct, eval_fn, tmp_path, acc, tracker, tasks=TASKS)
    finally:
        tracker.close()
    assert len(seen) == 4  # iterations 0 (start), 1, 2, 3
    best = seen[1]  # 0.9 after iteration 1; the later tie at iteration 3 keeps the earlier policy
    assert any(not torch.equal(best[k], seen[3][k]) for k in best)
    assert all(torch.equal(v, best[k]) for k, v in out.state_dict().items())
    rows = [r for r in read_metrics(tmp_path) if "selected_iteration" in r]
    assert rows == [{"stage": "rl", "step": 3, "selected_iteration": 1, "selected_success": 0.9}]
    assert json.loads((tmp_path / "best" / "best.json").read_text()) == {"iteration": 1, "success": 0.9}


def test_keep_best_needs_evaluations():
    with pytest.raises(ValueError, match="keep_best=true needs evaluations"):
        PPOConfig(keep_best=True, eval_every=0)


def test_full_finetune_reference_is_a_frozen_copy(warm_model, tok, tmp_path):
    ref = copy.deepcopy(warm_model)
    before = [p.clone() for p in ref.parameters()]
    policy, rows = run(small_cfg(algo="grpo", iterations=2, kl_coef=0.05), copy.deepcopy(warm_model), tok,
                       tmp_path, eval_n=4, ref_model=ref)
    assert all(torch.equal(a, b) for a, b in zip(before, ref.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert [r for r in rows if r["stage"] == "rl"][-1]["kl_ref"] > 0


def test_build_batch_truncation_keeps_whole_steps_and_folds_rewards(tok):
    steps = [Step("Pick a letter.", a, True) for a in "ABC"]
    traj = Trajectory(0, "t", steps, 1.0, True, system_prompt="Reply with one letter.")
    full = build_batch(tok, [traj], [[0.1, 0.2, 0.7]], 4096)
    cut_len = int(full.step_ends[0, 1]) + 1  # room for two steps
    cut = build_batch(tok, [traj], [[0.1, 0.2, 0.7]], cut_len)
    assert cut.step_ends[0].tolist() == full.step_ends[0, :2].tolist()
    assert cut.step_rewards[0].tolist() == pytest.approx([0.1, 0.9])
    assert cut.input_ids.shape[1] == cut_len
    with pytest.raises(ValueError, match="2 rewards for trajectory 0 with 3 steps"):
        build_batch(tok, [traj], [[0.1, 0.2]], 4096)


def test_config_rejects_bad_values_naming_the_key():
    with pytest.raises(ValueError, match="rl.algo='ppo2'"):
        PPOConfig(algo="ppo2")
    with pytest.raises(ValueError, match="rl.critic"):
        PPOConfig(critic="huge")
    with pytest.raises(ValueError, match="rl.ppo_epochs=0"):
        PPOConfig(ppo_epochs=0)
    assert PPOConfig(algo="grpo", advantage_level="turn").estimator == "grpo_step"
    assert not PPOConfig(algo="rloo").uses_critic


def test_train_rl_rejects_indivisible_minibatch(tok, tmp_path):
    acc = Accelerator(cpu=True)
    with pytest.raises(ValueError, match="minibatch_size=8 must be divisible by processes x grad_accum_steps"):
        train_rl(small_cfg(grad_accum_steps=3), tiny_model(tok), tok, None, None, None, tmp_path, acc, None,
                 tasks=TASKS)
    with pytest.raises(ValueError, match="must be divisible by rl.minibatch_size=5"):
        train_rl(small_cfg(minibatch_size=5), tiny_model(tok), tok, None, None, None, tmp_path, acc, None,
                 tasks=TASKS)


def test_draw_tasks_depends_only_on_seed_and_iteration():
    a = ppo.draw_tasks(TASKS, 4, seed=3, iteration=7)
    assert a == ppo.draw_tasks(TASKS, 4, seed=3, iteration=7)
    assert len(set(a)) == 4 and a != ppo.draw_tasks(TASKS, 4, seed=3, iteration=8)


def test_tracker_writes_jsonl_and_wandb_goes_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    acc = Accelerator(cpu=True)
    tr = Tracker(tmp_path, acc, backends=["wandb"])
    assert os.environ["WANDB_MODE"] == "offline"
    tr.log({"reward": 0.5, "x": torch.tensor(2.0), "nan": float("nan")}, stage="rl", step=3)
    # flushed per line: readable before close
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"stage": "rl", "step": 3, "reward": 0.5,
                                                                     "x": 2.0, "nan": None}
    tr.close()


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(step))
        save_checkpoint(acc, root, step, {"iteration": step}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_3"]
    (root / "step_9.tmp").mkdir()  # a half-written checkpoint is never picked
    (root / "step_7").mkdir()  # neither is one without its extra state
    assert latest_checkpoint(root).name == "step_3"
    with torch.no_grad():
        model.weight.zero_()
    assert load_checkpoint(acc, root / "step_2") == {"iteration": 2}
    assert torch.all(model.weight == 2.0)
    assert latest_checkpoint(tmp_path / "none") is None


def _varied_batch(tok):
    trajs = [Trajectory(i, "t", [Step("Pick a letter.", a, True) for a in actions], 0.5, False,
                        system_prompt="Reply with one letter.")
             for i, actions in enumerate([["A"], ["B", "C", "D"], ["C", "A"], ["D", "D", "B", "A"]])]
    return build_batch(tok, trajs, [[0.0] * t.num_steps for t in trajs], 512)


@pytest.mark.parametrize("chunk,max_tokens", [(1, 0), (3, 0), (4, 1)])
def test_scoring_in_length_sorted_micro_batches_equals_full_logits(warm_model, tok, chunk, max_tokens, monkeypatch):
    """Old/reference log-probs and values of differently long trajectories, scored longest first
    in micro-batches cut to their own length (and, with a token budget, into pieces of one row
    here), equal one full-logits forward of the padded batch."""
    shapes = []
    score_rows = scoring.score_rows

    def spy(acc, fn, *a, **k):
        return score_rows(acc, lambda ids, *r: shapes.append(ids.shape) or fn(ids, *r), *a, **k)

    monkeypatch.setattr(scoring, "score_rows", spy)
    acc = Accelerator(cpu=True)
    model = copy.deepcopy(warm_model)
    wrapped = ppo.PolicyWithValue(model, "shared")
    with torch.no_grad():
        wrapped.value_head.weight.normal_(0, 1.0)
    wrapped = acc.prepare(wrapped)
    batch = _varied_batch(tok)
    logp, values, ref = ppo._score(acc, wrapped, copy.deepcopy(model), batch, chunk, want_values=True, want_ref=True,
                                   temperature=0.7, max_tokens=max_tokens)
    rows_per_forward = [s[0] for s in shapes]
    assert rows_per_forward == ([1] * 8 if max_tokens or chunk == 1 else [3, 1, 3, 1])
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        expected = algos.token_logprobs(out.logits / 0.7, batch.input_ids)
        v = torch.nn.functional.pad(wrapped.value_head(out.hidden_states[-1]).squeeze(-1)[:, :-1], (1, 0))
    m = batch.action_mask.bool()
    assert torch.allclose(logp[m], expected[m], atol=1e-5) and torch.allclose(ref[m], expected[m], atol=1e-5)
    assert not logp[~m].any() and not ref[~m].any()
    real = batch.attention_mask.bool()
    assert torch.allclose(values[real], v[real], atol=1e-5)
    some = torch.tensor([1, 3])  # only these rows get old log-probs; the others stay 0
    logp2, _, _ = ppo._score(acc, wrapped, None, batch, chunk, want_values=False, want_ref=False, temperature=0.7,
                             old_rows=some, max_tokens=max_tokens)
    assert torch.equal(logp2[some], logp[some]) and not logp2[torch.tensor([0, 2])].any()


def test_skipping_the_old_pass_gives_the_same_training(warm_model, tok, tmp_path, monkeypatch):
    """Without a critic or dropout the first minibatch of epoch 0 takes old = new.detach() from the
    update's own forward instead of a scoring pass: same weights and metrics as scoring it."""
    cfg = small_cfg(algo="grpo", iterations=2, ppo_epochs=2, minibatch_size=8, kl_coef=0.1, eval_every=0,
                    eval_at_start=False)
    skip, rows_skip = run(cfg, copy.deepcopy(warm_model), tok, tmp_path / "skip", eval_n=4)
    monkeypatch.setattr(ppo, "_has_dropout", lambda model: True)  # forces the full old pass
    full, rows_full = run(cfg, copy.deepcopy(warm_model), tok, tmp_path / "full", eval_n=4)
    rows_skip, rows_full = ([r for r in rows if r["stage"] == "rl"] for rows in (rows_skip, rows_full))
    n = cfg.tasks_per_iter * cfg.group_size
    assert [r["score_sequences"] for r in rows_skip] == [n - cfg.minibatch_size + n] * 2  # old rows + ref rows
    assert [r["score_sequences"] for r in rows_full] == [2 * n] * 2
    for a, b in zip(skip.parameters(), full.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(rows_skip, rows_full):
        for key in ("policy_loss", "kl_loss", "clip_frac", "approx_kl", "entropy", "kl_ref", "reward"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def _fresh_lora(tok, **kw):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(tok, seed=1)
    torch.manual_seed(0)  # lora_A's random init: the same adapter every call
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw))


def test_adapter_is_identity_only_when_provably_so(tok):
    from rl.models import adapter_is_identity

    policy = _fresh_lora(tok)
    assert adapter_is_identity(policy)  # peft starts every lora_B at zero
    with policy.disable_adapter():
        assert not adapter_is_identity(policy)  # not provable from a disabled adapter: no shortcut
    with torch.no_grad():
        next(p for n, p in policy.named_parameters() if "lora_B" in n)[0, 0] = 1e-3
    assert not adapter_is_identity(policy)
    assert not adapter_is_identity(tiny_model(tok, seed=1))  # no adapter at all
    assert not adapter_is_identity(_fresh_lora(tok, use_dora=True))  # DoRA rescales even with B = 0


def test_fresh_adapter_skips_the_reference_pass_and_trains_the_same(tok, tmp_path, monkeypatch):
    """On a fresh LoRA adapter the policy is its adapter-off reference, so iteration 1 takes the
    reference log-probs from the old ones: no reference pass, the same weights and metrics."""
    cfg = small_cfg(algo="grpo", iterations=2, ppo_epochs=2, minibatch_size=8, kl_coef=0.1, eval_every=0,
                    eval_at_start=False, lr=2e-2, ent_coef=0.5)  # the entropy bonus moves it even at 0 advantage
    skip, rows_skip = run(cfg, _fresh_lora(tok), tok, tmp_path / "skip", eval_n=4)
    monkeypatch.setattr(ppo, "adapter_is_identity", lambda model: False)
    full, rows_full = run(cfg, _fresh_lora(tok), tok, tmp_path / "full", eval_n=4)
    rows_skip, rows_full = ([r for r in rows if r["stage"] == "rl"] for rows in (rows_skip, rows_full))
    n, mb = cfg.tasks_per_iter * cfg.group_size, cfg.minibatch_size
    # iteration 1: old rows only (the first minibatch is scored by the update itself); iteration 2:
    # the adapter has moved, so the reference pass is back
    assert [r["score_sequences"] for r in rows_skip] == [n - mb, n - mb + n]
    assert [r["score_sequences"] for r in rows_full] == [n - mb + n] * 2
    assert rows_skip[0]["kl_ref"] == 0.0 and rows_skip[1]["kl_ref"] > 1e-6
    for a, b in zip(skip.parameters(), full.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(rows_skip, rows_full):
        for key in ("policy_loss", "kl_loss", "clip_frac", "approx_kl", "entropy", "kl_ref", "reward"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


@pytest.mark.parametrize("estimator", ["grpo", "grpo_step", "rloo", "given"])
def test_windowed_batch_gives_every_action_token_its_steps_advantage(tok, estimator):
    """A history-windowed batch (several sequences per trajectory, context actions unmasked) gets,
    on every trained action token, the advantage the one-sequence batch gives that step."""
    rng = torch.Generator().manual_seed(0)
    trajs = [Trajectory(i, "t", [Step(f"Pick {j}.", "ABCD"[(i + j) % 4], True) for j in range(n)], 0.0, False,
                        group_id=i // 2, system_prompt="Reply with one letter.")
             for i, n in enumerate([5, 3, 6, 2])]
    rewards = [torch.randn(t.num_steps, generator=rng).tolist() for t in trajs]
    fn = algos.ADVANTAGE_ESTIMATORS[estimator]
    full = build_batch(tok, trajs, rewards, 512)
    win = build_batch(tok, trajs, rewards, 512, history_turns=1)
    assert len(win.input_ids) == 2 + 4 + 1 + 5 and not win.one_row_per_trajectory  # blocks per trajectory
    a_full, _ = ppo.advantages(fn, full, torch.zeros(full.input_ids.shape), 0.9, 1.0)
    a_win, _ = ppo.advantages(fn, win, torch.zeros(win.input_ids.shape), 0.9, 1.0)
    for b in range(len(trajs)):
        want = algos.gather_at_step_ends(a_full[b:b + 1], full.step_ends[b:b + 1])[0]
        rows = win.rows_of(torch.tensor([b]))
        got = torch.cat([algos.gather_at_step_ends(a_win[r:r + 1], win.step_ends[r:r + 1])[0][win.step_ends[r] >= 0]
                         for r in rows])
        assert torch.allclose(got, want[full.step_ends[b] >= 0], atol=1e-6), b
    assert not a_win[win.action_mask == 0].any()
    assert int(win.action_mask.sum()) == int(full.action_mask.sum())  # each action trained once


def test_history_window_needs_a_critic_free_algo(tok, tmp_path):
    with pytest.raises(ValueError, match="history_turns=2 needs a critic-free"):
        train_rl(small_cfg(algo="ppo"), tiny_model(tok), tok, None, None, None, tmp_path, Accelerator(cpu=True),
                 None, tasks=TASKS, history_turns=2)


def test_token_budget_pieces_give_the_same_update(warm_model, tok, tmp_path, monkeypatch):
    """rl.micro_batch_tokens cuts each micro-batch into pieces (here one sequence each): every
    optimizer step gets the same gradient sum, so metrics and weights equal the unsplit run's.
    (Weights are compared where the gradient is not ~0: Adam's first step is about lr * sign(g),
    so on a weight with |g| ~ 1e-9 float noise flips it, and later steps carry that on.)"""
    rows, lengths = torch.tensor([3, 1, 0, 2]), torch.tensor([5, 8, 4, 10])
    assert [p.tolist() for p in ppo.token_pieces(rows, lengths, 16)] == [[3], [1, 0], [2]]
    assert [p.tolist() for p in ppo.token_pieces(rows, lengths, 0)] == [[3, 1, 0, 2]]
    # a piece that starts on a short row (one group's last) is sized by its longest, not its first:
    # [4, 9] would be 2 x 9 = 18 > 16 padded tokens
    assert [p.tolist() for p in ppo.token_pieces(torch.tensor([0, 1, 2]), torch.tensor([10, 4, 9]), 16)] == [
        [0], [1], [2]]
    assert [p.tolist() for p in ppo.token_pieces(torch.tensor([0, 1, 2]), torch.tensor([10, 4, 9]), 18)] == [
        [0], [1, 2]]
    grads = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    # one minibatch of the whole batch, one epoch: a single optimizer step
    cfg = dict(algo="grpo", iterations=1, ppo_epochs=1, minibatch_size=16, kl_coef=0.1, eval_every=0,
               eval_at_start=False)
    whole, rows_whole = run(small_cfg(**cfg), copy.deepcopy(warm_model), tok, tmp_path / "whole", eval_n=4)
    split, rows_split = run(small_cfg(**cfg, micro_batch_tokens=1), copy.deepcopy(warm_model), tok,
                            tmp_path / "split", eval_n=4)
    assert len(grads) == 2
    for gw, gs, a, b in zip(grads[0], grads[1], whole.parameters(), split.parameters()):
        torch.testing.assert_close(gs, gw, atol=1e-6, rtol=1e-4)
        clear = gw.abs() > 1e-6
        torch.testing.assert_close(a[clear], b[clear], atol=1e-6, rtol=0)
    assert max(g.abs().max().item() for g in grads[0]) > 1e-2
    a, b = rows_whole[0], rows_split[0]
    for key in ("policy_loss", "kl_loss", "entropy", "approx_kl", "grad_norm"):
        assert a[key] == pytest.approx(b[key], abs=1e-5), key
    # one-row pieces share nothing; whole micro-batches run the groups' common prompt once
    real = b["prompt_tokens"] + b["observation_tokens"] + b["action_tokens"]
    assert b["update_tokens_run"] == real and a["update_tokens_run"] < real - b["prompt_tokens"] / 2


def test_separate_critic_reads_its_own_backbone(warm_model, tok):
    wrapped = ppo.PolicyWithValue(copy.deepcopy(warm_model), "separate")
    with torch.no_grad():
        wrapped.value_head.weight.normal_(0, 1.0)
        for p in wrapped.critic_backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = _varied_batch(tok)
    with torch.no_grad():
        logp, _, values = wrapped(batch.input_ids, batch.attention_mask, batch.action_mask)
        hidden = wrapped.critic_backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         output_hidden_states=True).hidden_states[-1]
        want = torch.nn.functional.pad(wrapped.value_head(hidden).squeeze(-1)[:, :-1], (1, 0))
        ref = algos.token_logprobs(wrapped.policy(input_ids=batch.input_ids).logits, batch.input_ids)
    real, m = batch.attention_mask.bool(), batch.action_mask.bool()
    assert torch.allclose(values[real], want[real], atol=1e-5) and torch.allclose(logp[m], ref[m], atol=1e-5)


def test_gigpo_logs_its_advantages_under_their_own_name(warm_model, tok, tmp_path):
    # credit.mode=gigpo hands advantages to rl.algo=gigpo: here +1 per step of a won episode, -1 of a lost one
    def advantages_as_credit(trajs):
        return [[1.0 if t.success else -1.0] * t.num_steps for t in trajs]

    _, rows = run(small_cfg(algo="gigpo", iterations=1, eval_every=1), copy.deepcopy(warm_model), tok, tmp_path,
                  credit=advantages_as_credit, eval_n=4)
    (row,) = [r for r in rows if r["stage"] == "rl" and "outcome" in r]
    assert "reward" not in row
    # every toy episode has 2 steps: the per-episode sum is 2 (won) or -2 (lost), so its mean is 4·success - 2
    assert row["advantage_sum"] == pytest.approx(4 * row["success"] - 2)
