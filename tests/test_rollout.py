"""Rollout engine: lockstep batching, counts, failures, invalid replies, determinism, KV reuse."""

import time

import pytest
import torch

from rl.models import load_tokenizer, tiny_model
from rl import rollout as rollout_mod
from rl.rollout import (
    INVALID_REPLY, HFBackend, RolloutConfig, call_all_with_timeout, collect_rollouts, length_buckets, run_episodes,
)
from rl.trajectory import encode_conversation, tokenize_trajectory


class CountEnv:
    """Task "n-K" ends (won) after K env steps whatever the action; "raise-K" raises on step K;
    "hang-K" sleeps past the timeout on step K; "resetraise" raises in reset; "fussy-K" needs K
    steps and its parser rejects the first reply of each episode."""

    system_prompt = "Count with me. Reply with one word."
    instances: list["CountEnv"] = []

    def __init__(self):
        self.task, self.t, self.broken, self.steps_taken, self.parses = None, 0, False, 0, 0
        CountEnv.instances.append(self)

    def tasks(self, split):
        return ["n-1", "n-2"]

    def reset(self, task):
        assert not self.broken, "a failed env must never be reused"
        if task == "resetraise":
            self.broken = True
            raise RuntimeError("cannot start")
        self.task, self.t, self.parses = task, 0, 0
        return f"{task} start", {"valid": True, "won": False, "score": 0.0}

    def parse_action(self, reply):
        self.parses += 1
        if self.task.startswith("fussy") and self.parses == 1:
            return None
        return reply or "noop"

    def step(self, action):
        kind, _, k = self.task.partition("-")
        self.t += 1
        self.steps_taken += 1
        if kind == "raise" and self.t == int(k):
            self.broken = True
            raise ValueError("env bug")
        if kind == "hang" and self.t == int(k):
            self.broken = True
            time.sleep(1.5)
        done = self.t >= int(k)
        info = {"valid": self.t % 2 == 1, "won": done, "score": 1.0 if done else 0.25 * self.t, "progress": 0.5}
        return f"{self.task} obs {self.t}", 0.0, done, info




def _model(tok, seed=0):
    # a larger init than the default makes greedy replies depend on the context (no constant
    # argmax), so equality tests compare real, varied text
    model = tiny_model(tok, hidden=32, layers=2, heads=2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model(tok):
    return _model(tok)


def _count_generate(model, monkeypatch):
    calls = []
    orig = model.generate

    def wrapped(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        calls.append((kwargs["input_ids"].shape[0], cache.get_seq_length() if cache is not None else 0))
        return orig(*args, **kwargs)

    monkeypatch.setattr(model, "generate", wrapped)
    return calls


def _actions(trajs):
    return [[s.action for s in t.steps] for t in trajs]


def test_lockstep_counts_groups_and_one_generate_per_turn(tok, model, monkeypatch):
    calls = _count_generate(model, monkeypatch)
    cfg = RolloutConfig(max_turns=10, max_new_tokens=6, num_envs=3)
    tasks = ["n-1", "n-3", "n-2", "n-5"]
    trajs = collect_rollouts(model, tok, CountEnv, tasks, cfg, group_size=2, seed=3)
    assert [t.traj_id for t in trajs] == list(range(8))
    assert [t.group_id for t in trajs] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [t.task for t in trajs] == [t for t in tasks for _ in range(2)]
    assert [t.num_steps for t in trajs] == [1, 1, 3, 3, 2, 2, 5, 5]
    assert all(t.success and t.outcome == 1.0 and t.failed is None for t in trajs)
    # episode lengths 1,1,3,3,2,2,5,5 in 3 slots refilled as soon as one ends (worked by hand):
    # 9 turns with batch sizes 3,3,3,3,3,2,2,2,1 (22 steps), one generate call each
    assert [b for b, _ in calls] == [3, 3, 3, 3, 3, 2, 2, 2, 1]
    t = trajs[5]  # "n-2"
    assert [s.observation for s in t.steps] == ["n-2 start", "n-2 obs 1"]
    assert t.final_observation == "n-2 obs 2" and t.system_prompt == CountEnv.system_prompt
    assert [s.valid for s in t.steps] == [True, False]  # from env info
    assert t.steps[0].info == {"valid": True, "won": False, "score": 0.25, "progress": 0.5}
    assert t.stats["turns"] == 2 and t.stats["invalid_actions"] == 1 and t.stats["malformed_replies"] == 0
    assert all(0 < t.stats["gen_tokens"] <= t.num_steps * 6 and t.stats["wall_time_s"] > 0 for t in trajs)
    assert sum(t.stats["gen_tokens"] for t in trajs) > sum(t.num_steps for t in trajs)  # not all instant EOS


def test_incremental_prompt_ids_equal_full_encoding(monkeypatch):
    orig = HFBackend.generate
    for name in ("tiny", "tiny-llama3"):
        tok = load_tokenizer(name)
        model = _model(tok, seed=1)
        seen = []

        def spy(self, prompts, slots, seed):
            seen.extend(tuple(p) for p in prompts)
            return orig(self, prompts, slots, seed)

        monkeypatch.setattr(HFBackend, "generate", spy)
        cfg = RolloutConfig(max_turns=6, max_new_tokens=8, num_envs=2)
        trajs = collect_rollouts(model, tok, CountEnv, ["n-4", "n-2", "n-3"], cfg, seed=0)
        assert len(seen) == sum(t.num_steps for t in trajs) == 9
        for traj in trajs:
            obs, acts = [s.observation for s in traj.steps], [s.action for s in traj.steps]
            full = tokenize_trajectory(tok, traj).input_ids
            for t in range(traj.num_steps):
                prompt = encode_conversation(tok, traj.system_prompt, obs[: t + 1], acts[:t], True).input_ids
                assert tuple(prompt) in seen, (name, traj.traj_id, t)
                assert full[: len(prompt)] == prompt


def test_kv_cache_reuse_matches_fresh_prefill_greedy(tok, model, monkeypatch):
    cfg = RolloutConfig(max_turns=10, max_new_tokens=8, num_envs=3, reuse_cache=False)
    tasks = ["n-4", "n-1", "n-3", "n-2", "fussy-3", "n-5"]
    ref = collect_rollouts(model, tok, CountEnv, tasks, cfg, greedy=True)
    calls = _count_generate(model, monkeypatch)
    cfg.reuse_cache = True
    got = collect_rollouts(model, tok, CountEnv, tasks, cfg, greedy=True)
    assert _actions(got) == _actions(ref)
    assert len({a for acts in _actions(ref) for a in acts}) > 5  # varied replies, not one constant
    # the cache was really reused on later turns (only new tokens fed)
    assert calls[0][1] == 0 and sum(c > 0 for _, c in calls) >= len(calls) - 2


def test_sampling_is_seeded(tok, model):
    cfg = RolloutConfig(max_turns=4, max_new_tokens=8, num_envs=2, temperature=1.0)
    runs = [collect_rollouts(model, tok, CountEnv, ["n-3", "n-2"], cfg, group_size=2, seed=s) for s in (5, 5, 6)]
    drop_time = [[{**t.to_dict(), "stats": {k: v for k, v in t.stats.items() if k != "wall_time_s"}}
                  for t in r] for r in runs]
    assert drop_time[0] == drop_time[1]
    assert _actions(runs[0]) != _actions(runs[2])
    # the two rollouts of a group sample different replies (rows do not share a random stream)
    assert _actions(runs[0])[0] != _actions(runs[0])[1]


def test_failures_are_counted_and_slots_get_fresh_envs(tok, model):
    CountEnv.instances.clear()
    cfg = RolloutConfig(max_turns=5, max_new_tokens=4, num_envs=2, step_timeout_s=0.3)
    tasks = ["n-2", "raise-1", "hang-1", "n-1", "resetraise", "n-2"]
    t0 = time.monotonic()
    trajs = collect_rollouts(model, tok, CountEnv, tasks, cfg)
    assert time.monotonic() - t0 < 20
    failed = [t.traj_id for t in trajs if t.failed]
    assert failed == [1, 2, 4]
    assert "ValueError" in trajs[1].failed and "TimeoutError" in trajs[2].failed
    assert trajs[4].failed.startswith("reset") and trajs[4].num_steps == 0
    assert all(t.outcome == 0.0 and not t.success and t.stats["failed"] == 1 for t in trajs if t.failed)
    assert [t.num_steps for t in trajs if not t.failed] == [2, 1, 2]
    assert all(t.success for t in trajs if not t.failed)
    # 2 slots + one fresh env after each of the 3 failures (each had episodes still queued)
    assert len(CountEnv.instances) == 5


def test_malformed_reply_is_invalid_step_not_env_step(tok, model):
    CountEnv.instances.clear()
    cfg = RolloutConfig(max_turns=10, max_new_tokens=4, num_envs=1)
    (traj,) = collect_rollouts(model, tok, CountEnv, ["fussy-2"], cfg)
    assert traj.num_steps == 3 and traj.success
    assert [s.valid for s in traj.steps] == [False, True, False]
    assert traj.steps[0].info == {"parsed": False}  # CountEnv reports no state: no state_before
    assert traj.steps[1].observation == INVALID_REPLY + traj.steps[0].observation
    assert CountEnv.instances[0].steps_taken == 2  # the env was not stepped on the bad reply
    assert traj.stats["malformed_replies"] == 1 and traj.stats["invalid_actions"] == 2


def test_turn_limit_and_prompt_limit_end_episodes(tok, model):
    cfg = RolloutConfig(max_turns=3, max_new_tokens=4, num_envs=2)
    (cut,) = collect_rollouts(model, tok, CountEnv, ["n-50"], cfg)
    assert cut.num_steps == 3 and cut.stats["truncated"] == 1 and not cut.success
    assert cut.outcome == 0.75  # the last info score
    first = len(encode_conversation(tok, CountEnv.system_prompt, ["n-50 start"], [], True).input_ids)
    cfg = RolloutConfig(max_turns=30, max_new_tokens=4, num_envs=2, max_prompt_tokens=first + 1)
    tiny_limit = collect_rollouts(model, tok, CountEnv, ["n-50", "n-50"], cfg)[0]
    assert tiny_limit.num_steps == 1 and tiny_limit.stats["prompt_overflow"] == 1
    cfg.max_prompt_tokens = first - 1
    none = collect_rollouts(model, tok, CountEnv, ["n-50"], cfg)[0]
    assert none.num_steps == 0 and none.stats["prompt_overflow"] == 1 and none.failed is None


def test_stop_strings_cut_replies(tok, model):
    cfg = RolloutConfig(max_turns=3, max_new_tokens=12, num_envs=2)
    plain = collect_rollouts(model, tok, CountEnv, ["n-3", "n-3"], cfg, greedy=True)
    assert any(" " in a for acts in _actions(plain) for a in acts)
    cfg.stop_strings = [" "]
    cut = collect_rollouts(model, tok, CountEnv, ["n-3", "n-3"], cfg, greedy=True)
    assert all(" " not in a for acts in _actions(cut) for a in acts)
    assert sum(t.stats["gen_tokens"] for t in cut) < sum(t.stats["gen_tokens"] for t in plain)


class FakeAccelerator:
    def __init__(self, rank, world):
        self.process_index, self.num_processes = rank, world

    def unwrap_model(self, model):
        return model


def test_sharded_rollouts_gather_in_single_process_order(tok, model, monkeypatch):
    import accelerate.utils

    cfg = RolloutConfig(max_turns=6, max_new_tokens=4, num_envs=2)
    tasks = ["n-1", "n-3", "n-2"]
    shares = []
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: shares.append(list(objs)) or
                        [t for share in shares for t in share])
    collect_rollouts(model, tok, CountEnv, tasks, cfg, group_size=2, accelerator=FakeAccelerator(0, 2))
    full = collect_rollouts(model, tok, CountEnv, tasks, cfg, group_size=2, accelerator=FakeAccelerator(1, 2))
    assert [[t.traj_id for t in s] for s in shares] == [[0, 2, 4], [1, 3, 5]]  # strided shares
    assert [t.traj_id for t in full] == list(range(6))
    assert [(t.task, t.group_id, t.num_steps) for t in full] == [
        ("n-1", 0, 1), ("n-1", 0, 1), ("n-3", 1, 3), ("n-3", 1, 3), ("n-2", 2, 2), ("n-2", 2, 2)]


def test_bad_config_and_missing_vllm_fail_early(tok, model):
    with pytest.raises(ValueError, match="rollout.backend"):
        RolloutConfig(backend="sglang")
    with pytest.raises(ValueError, match="num_envs"):
        RolloutConfig(num_envs=0)
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm installed")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="vllm"):
        collect_rollouts(model, tok, CountEnv, ["n-1"], RolloutConfig(backend="vllm"))


def test_call_all_with_timeout():
    out = call_all_with_timeout([lambda: 1, lambda: 1 / 0, lambda: time.sleep(1)], 0.2)
    assert out[0] == (True, 1)
    assert not out[1][0] and isinstance(out[1][1], ZeroDivisionError)
    assert not out[2][0] and isinstance(out[2][1], TimeoutError)
    assert call_all_with_timeout([lambda: 2], 0) == [(True, 2)]


def test_run_episodes_empty():
    assert run_episodes(None, None, CountEnv, [], RolloutConfig()) == []


DIST_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
sys.path.insert(0, sys.argv[2])
from test_rollout import CountEnv
from rl.models import load_tokenizer, tiny_model
from rl.rollout import RolloutConfig, collect_rollouts
from rl.train import leave_process_group

torch.set_num_threads(1)
acc = Accelerator(cpu=True)
tok = load_tokenizer("tiny")
trajs = collect_rollouts(tiny_model(tok), tok, CountEnv, ["n-1", "n-3", "n-2"], RolloutConfig(num_envs=2,
                         max_new_tokens=4), group_size=2, accelerator=acc)
out = [(t.traj_id, t.task, t.group_id, t.num_steps) for t in trajs]
open(f"{sys.argv[1]}/rank{acc.process_index}.json", "w").write(json.dumps(out))
# leave the gloo group together: a rank that exits while its peer's gloo threads still hold the
# connection can abort the peer ("terminate called without an active exception", SIGABRT)
acc.wait_for_everyone()
leave_process_group()
"""


@pytest.mark.slow
def test_accelerate_launch_two_processes_gathers_everything(tmp_path):
    import json
    import os
    import socket
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "dist_rollout.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    with socket.socket() as sock:  # a free port: other test runs may hold the config's default
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # launch/cpu_2proc.yaml explains why plain `--cpu --num_processes 2` starts one process
    proc = subprocess.run(["accelerate", "launch", "--config_file", str(repo / "launch" / "cpu_2proc.yaml"),
                           "--main_process_port", str(port), str(script), str(tmp_path), str(repo / "tests")],
                          cwd=repo, env=env, timeout=170, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = [[0, "n-1", 0, 1], [1, "n-1", 0, 1], [2, "n-3", 1, 3], [3, "n-3", 1, 3], [4, "n-2", 2, 2],
                [5, "n-2", 2, 2]]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


def test_history_window_prompts_are_the_windowed_conversation_and_its_training_prefix(tok, monkeypatch):
    """With rollout.history_turns the engine generates from system + first observation + the
    window (`windowed_context`), extending the prompt within a block and re-encoding when the
    window moves; each prompt is the prefix of the training sequence that scores that step."""
    from rl.trajectory import tokenize_windows, windowed_context

    model = _model(tok, seed=1)
    orig = HFBackend.generate
    seen = []

    def spy(self, prompts, slots, seed):
        seen.extend(tuple(p) for p in prompts)
        return orig(self, prompts, slots, seed)

    monkeypatch.setattr(HFBackend, "generate", spy)
    cfg = RolloutConfig(max_turns=9, max_new_tokens=4, num_envs=2, history_turns=2)
    trajs = collect_rollouts(model, tok, CountEnv, ["n-7", "n-3", "n-6"], cfg, seed=0, greedy=True)
    assert len(seen) == sum(t.num_steps for t in trajs) == 16
    for traj in trajs:
        obs, acts = [s.observation for s in traj.steps], [s.action for s in traj.steps]
        rows = {first + j: (view, e) for view, first in tokenize_windows(tok, traj, 2)
                for j, e in enumerate(view.step_ends)}
        for t in range(traj.num_steps):
            prompt = encode_conversation(tok, traj.system_prompt, *windowed_context(obs, acts, t, 2), True).input_ids
            assert tuple(prompt) in seen, (traj.traj_id, t)
            view, _ = rows[t]
            assert view.input_ids[: len(prompt)] == prompt and view.action_mask[len(prompt)] == 1
        longest = max(len(p) for p in seen)
        assert longest < len(tokenize_trajectory(tok, traj).input_ids) or traj.num_steps < 5
    # greedy replies with the KV cache reused equal fresh prefills, across window moves
    monkeypatch.setattr(HFBackend, "generate", orig)
    cfg.reuse_cache = False
    ref = collect_rollouts(model, tok, CountEnv, ["n-7", "n-3", "n-6"], cfg, seed=0, greedy=True)
    assert _actions(ref) == _actions(trajs)


def test_generation_runs_the_lm_head_on_one_position_per_row(tok):
    """No full-prompt logits during generation: prefill and every decode step (KV cache reused
    across turns) project only the last position through the LM head (transformers'
    logits_to_keep=1), so rollout memory does not grow with prompt length x vocabulary."""
    model = _model(tok, seed=1)
    widths = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, inp, out: widths.append(inp[0].shape[1]))
    try:
        cfg = RolloutConfig(max_turns=4, max_new_tokens=6, num_envs=3)
        trajs = collect_rollouts(model, tok, CountEnv, ["n-4", "n-2", "n-3"], cfg, seed=0)
    finally:
        hook.remove()
    assert sum(t.num_steps for t in trajs) == 9 and len(widths) >= 9
    assert set(widths) == {1}


def test_a_groups_shared_first_prompt_is_encoded_once(tok, model, monkeypatch):
    """G rollouts of a task start from the same prompt: its KV is computed once and copied, and
    greedy replies equal those of the path that encodes every row itself (no reuse)."""
    cfg = RolloutConfig(max_turns=4, max_new_tokens=8, num_envs=6, reuse_cache=False)
    tasks = ["n-4", "n-3", "fussy-3"]
    ref = collect_rollouts(model, tok, CountEnv, tasks, cfg, group_size=2, greedy=True)
    fed = []
    hook = model.register_forward_pre_hook(lambda mod, args, kw: fed.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        backend = HFBackend(model, tok, RolloutConfig(max_turns=4, max_new_tokens=8, num_envs=6), greedy=True)
        got = run_episodes(backend, tok, CountEnv, [(i * 2 + k, t, i) for i, t in enumerate(tasks) for k in range(2)],
                           RolloutConfig(max_turns=4, max_new_tokens=8, num_envs=6))
    finally:
        hook.remove()
    assert _actions(got) == _actions(ref)
    assert backend.shared_rows == 3  # 6 rows, 3 distinct first prompts
    # the shared prefill ran on the 3 distinct prompts (all but their last token), then generate
    # fed each of the 6 rows its last prompt token only
    assert fed[0][0] == 3 and fed[1] == (6, 1)


def _lora_policy(tok, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(_model(tok), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:  # a trained-looking adapter: B = 0 would make merging a no-op
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return policy.to(dtype).eval()


def test_lora_is_merged_while_generating_and_the_weights_come_back(tok, monkeypatch):
    from peft.tuners.lora import LoraLayer

    policy = _lora_policy(tok)
    layers = [m for m in policy.modules() if isinstance(m, LoraLayer)]
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        ref_logits = policy(ids).logits
    merged_during = []
    orig = policy.generate

    def spy(*args, **kwargs):
        merged_during.append(all(layer.merged for layer in layers))
        return orig(*args, **kwargs)

    monkeypatch.setattr(policy, "generate", spy)
    tasks = ["n-4", "n-1", "n-3", "fussy-3"]
    cfg = RolloutConfig(max_turns=6, max_new_tokens=8, num_envs=2, merge_lora=False)
    unmerged = collect_rollouts(policy, tok, CountEnv, tasks, cfg, greedy=True)
    assert merged_during and not any(merged_during)
    merged_during.clear()
    cfg.merge_lora = True
    merged = collect_rollouts(policy, tok, CountEnv, tasks, cfg, greedy=True)
    assert merged_during and all(merged_during)  # every generate call ran on merged weights
    assert _actions(merged) == _actions(unmerged)
    assert len({a for acts in _actions(merged) for a in acts}) > 3
    # after the rollout: unmerged again, every weight back to within fp32 rounding, same outputs
    assert not any(layer.merged for layer in layers)
    for n, p in policy.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(policy(ids).logits, ref_logits, rtol=0, atol=1e-5)


def test_lora_merge_is_skipped_where_it_would_change_the_policy(tok):
    from peft.tuners.lora import LoraLayer

    from rl.models import lora_merged

    plain = _model(tok)
    with lora_merged(plain) as m:  # no adapter: nothing to do, no peft needed
        assert m is plain
    for policy, ctx in ((_lora_policy(tok, torch.bfloat16), None), (_lora_policy(tok), "disabled")):
        layers = [m for m in policy.modules() if isinstance(m, LoraLayer)]
        if ctx == "disabled":  # the adapter-off reference: merging would switch the adapter back on
            with policy.disable_adapter(), lora_merged(policy):
                assert not any(layer.merged for layer in layers)
        else:  # bf16: W + d - d would not give W back
            with lora_merged(policy):
                assert not any(layer.merged for layer in layers)


def test_length_buckets_minimise_padded_positions_plus_a_cost_per_forward():
    # sorted: row 1 (3), row 3 (4), row 4 (98), row 2 (100); row 0 has nothing to encode
    assert length_buckets([0, 3, 100, 4, 98], overhead=10) == [[1, 3], [4, 2]]  # 18 + 210 < 410
    assert length_buckets([0, 3, 100, 4, 98], overhead=1000) == [[1, 3, 4, 2]]
    assert length_buckets([5, 5, 5], overhead=1) == [[0, 1, 2]]
    assert length_buckets([0, 0]) == []
    # cost of the DP's answer equals a brute force over all contiguous splits of the sorted rows
    import itertools
    lengths, ov = [7, 1, 30, 2, 29, 12, 0, 13], 5
    srt = sorted(n for n in lengths if n)
    def cost(bs):
        return sum(ov + len(b) * max(lengths[i] for i in b) for b in bs)
    brute = min(sum(ov + (j - i) * srt[j - 1] for i, j in zip((0,) + c, c + (len(srt),)))
                for r in range(len(srt)) for c in itertools.combinations(range(1, len(srt)), r))
    assert cost(length_buckets(lengths, ov)) == brute


def test_bucketed_prefill_gives_the_same_replies_with_fewer_positions(tok, model, monkeypatch):
    """Each turn's new prompt tokens encoded in length buckets (a restarted slot's whole first
    prompt apart from the other rows' short increments): greedy replies equal those of the padded
    batch and of no reuse at all; the same real tokens are fed, in fewer computed positions."""
    monkeypatch.setattr(rollout_mod, "BUCKET_OVERHEAD_TOKENS", 0)
    tasks = ["n-4", "n-1", "n-3", "n-2", "fussy-3", "n-5", "n-2", "n-1"]
    episodes = [(i, t, i) for i, t in enumerate(tasks)]
    ref = collect_rollouts(model, tok, CountEnv, tasks, RolloutConfig(max_turns=6, max_new_tokens=8, num_envs=3,
                                                                        reuse_cache=False), greedy=True)
    runs = {}
    for mode in ("off", "on"):
        cfg = RolloutConfig(max_turns=6, max_new_tokens=8, num_envs=3, bucket_prefill=mode)
        backend = HFBackend(model, tok, cfg, greedy=True)
        runs[mode] = backend, run_episodes(backend, tok, CountEnv, episodes, cfg)
    assert _actions(runs["on"][1]) == _actions(runs["off"][1]) == _actions(ref)
    assert len({a for acts in _actions(ref) for a in acts}) > 5
    on, off = runs["on"][0], runs["off"][0]
    assert on.prefill_tokens == off.prefill_tokens
    assert on.prefill_positions < off.prefill_positions
    assert off.prefill_positions > off.prefill_tokens  # the padded batch did pay for padding
    # "auto" leaves the tiny model padded (the copies cost more than the padding there); bad values fail
    assert not HFBackend(model, tok, RolloutConfig(), greedy=True).bucket
    with pytest.raises(ValueError, match="bucket_prefill"):
        RolloutConfig(bucket_prefill="yes")


def test_each_step_records_the_state_its_action_was_taken_in(tok, model):
    """An env that reports info["state"] gets it back per step as `state_before`: the reset's state
    for the first action, the previous step's after that, and unchanged across a malformed reply."""

    class StateEnv(CountEnv):
        def reset(self, task):
            obs, info = super().reset(task)
            return obs, {**info, "state": "s0"}

        def step(self, action):
            obs, r, done, info = super().step(action)
            return obs, r, done, {**info, "state": f"s{self.t}"}

    cfg = RolloutConfig(max_turns=10, max_new_tokens=4, num_envs=1)
    (traj,) = collect_rollouts(model, tok, StateEnv, ["fussy-2"], cfg)
    assert [s.info.get("state_before") for s in traj.steps] == ["s0", "s0", "s1"]
    assert [s.info.get("state") for s in traj.steps] == [None, "s1", "s2"]
