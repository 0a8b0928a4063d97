"""benchmarks/iteration.py's FLOP accounting and forward-pass equivalents on a hand-made metrics
row (numbers checked by hand)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("iteration_bench", ROOT / "benchmarks" / "iteration.py")
it = importlib.util.module_from_spec(spec)
spec.loader.exec_module(it)

ROW = {"prompt_tokens": 700, "observation_tokens": 1100, "action_tokens": 200, "score_sequences": 8,
       "score_tokens_run": 1000, "update_tokens_run": 1000, "rollout_time": 10.0, "score_time": 5.0,
       "update_time": 14.0}


def test_phase_flops_lora_counts_no_weight_gradient():
    n, head = 100, 10
    lora = it.phase_flops(ROW, n, head, lora=True, epochs=1, episodes=8)
    # rollout: 2 N x 2000 real tokens + 2 V H x 200 action tokens
    assert lora["rollout"] == 2 * 100 * 2000 + 2 * 10 * 200
    # score: one pass per trajectory (8 sequences / 8 episodes): 2 N x 1000 + 2 V H x 200
    assert lora["score"] == 2 * 100 * 1000 + 2 * 10 * 200
    # update with LoRA: forward 2 + input gradient 2 per parameter and token, the head too
    assert lora["update"] == 4 * (100 * 1000 + 10 * 200)
    full = it.phase_flops(ROW, n, head, lora=False, epochs=2, episodes=8)
    assert full["update"] == 6 * (100 * 1000 + 2 * 10 * 200)


def test_forward_equivalents():
    fe = it.forward_equivalents(ROW, lora=True)
    # one forward: 5 s / 1000 tokens; the update: 14 s / 1000 tokens = 2.8 forwards
    assert fe["update_passes"] == pytest.approx(2.8)
    assert fe["floor"] == 2.0
    # at the floor: (5 + 2 x 5) / 10
    assert fe["ratio_at_floor"] == pytest.approx(1.5)
    assert it.forward_equivalents(ROW, lora=False)["ratio_at_floor"] == pytest.approx(2.0)
    assert it.forward_equivalents({**ROW, "score_tokens_run": 0}, lora=True) is None
