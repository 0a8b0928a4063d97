"""benchmarks/rss_over_iterations.py on a hand-made metrics.jsonl (numbers checked by hand)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("rss_over_iterations", ROOT / "benchmarks" / "rss_over_iterations.py")
rss = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rss)


def test_iteration_peaks_and_spread(tmp_path, capsys):
    recs = [{"stage": "sft", "step": 1, "loss": 1.0}]
    for it, (roll, upd) in enumerate([(1.0, 2.0), (1.1, 2.5), (1.2, 2.4), (1.0, 2.6)], start=1):
        recs.append({"stage": "rl", "step": it, "rollout_peak_rss_gib": roll, "credit_peak_rss_gib": 0.5,
                     "score_peak_rss_gib": 1.5, "update_peak_rss_gib": upd, "prompt_tokens": 100 * it,
                     "observation_tokens": 50, "action_tokens": 50, "rollout_cpu_time": 1.0, "credit_cpu_time": 0.0,
                     "score_cpu_time": 0.5, "update_cpu_time": float(it)})
    recs.append({"stage": "eval", "step": 4, "eval/success_rate": 0.5})
    recs.append({"stage": "rl", "step": 4, "selected_iteration": 0})  # a log line without phases
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    rows = rss.iteration_peaks(tmp_path / "metrics.jsonl")
    assert [it for it, _ in rows] == [1, 2, 3, 4] and rows[1][1]["update"] == 2.5
    assert rss.main([str(tmp_path), "--after", "1"]) == 0
    # after iteration 1 the peaks are 2.5, 2.4, 2.6: (2.6 - 2.4) / 2.4 = 8.3%
    out = capsys.readouterr().out
    assert "2.400-2.600 GiB, spread 8.3%" in out
    # k = max(1, 3 // 4) = 1: first 2.5, last 2.6, +4.0%
    assert "first 1 iterations after warm-up 2.500 GiB, of the last 1 2.600 GiB (+4.0%)" in out
    # iterations 2-4: (200 + 300 + 400) + 3 x 100 = 1200 tokens; update 2 + 3 + 4 = 9 s -> 7.5 ms, rollout 3 s -> 2.5
    assert "CPU ms per token after iteration 1: rollout 2.500, credit 0.000, score 1.250, update 7.500" in out
    assert rss.main([str(tmp_path / "missing")]) == 2


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_release_memory_returns_a_fragmented_heap(tmp_path):
    """Freed blocks below glibc's mmap threshold stay resident while a few survivors pin the heap;
    release_memory (gc + malloc_trim) gives their pages back. ~230 MiB freed, 1 in 16 kept."""
    import pytest

    from rl.phases import release_memory

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    blocks = [bytearray(4096) for _ in range(60_000)]
    keep = blocks[::16]  # noqa: F841 (survivors scattered through the heap)
    del blocks
    before = _rss_mib()
    if not release_memory():
        pytest.skip("no glibc malloc_trim here")
    assert before - _rss_mib() > 100
