"""benchmarks/horizon.py's summary line from a printed table (numbers checked by hand)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("horizon_bench", ROOT / "benchmarks" / "horizon.py")
hz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hz)

TABLE = """tiny + LoRA, 4 episodes of H turns, 6 new tokens per reply; per episode:
   H  history max prompt trained tok | rollout s   score s  update s | rollout cpu   score cpu  update cpu | peak GiB
  10      all        347         354 |      9.08      2.88      7.43 |        6.00        2.00        4.00 |     1.97
  10        4        220         518 |      9.26      4.19      9.73 |        5.00        2.00        3.00 |     2.42
  40      all       1304        1310 |     30.09      9.42     31.48 |       20.00        8.00       20.00 |     5.10
  40        4        284        2612 |     37.55     19.95     46.91 |       18.00        8.00        9.00 |     8.88
"""


def test_parse_table_sums_cpu_seconds():
    t = hz.parse_table(TABLE)
    assert t == {"all": {10: 12.0, 40: 48.0}, "4": {10: 10.0, 40: 35.0}}


def test_summary_ratio_per_history():
    line = hz.summary(hz.parse_table(TABLE))
    assert line == "CPU cost per episode, 40 vs 10 turns: whole history 4.00x, history_turns 4 3.50x"


def test_summary_needs_rows():
    with pytest.raises(ValueError):
        hz.summary(hz.parse_table("no table here"))


def test_from_output_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        hz.main(["--from-output", str(tmp_path / "missing.txt")])
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "other.txt").write_text("some other output\n")
    with pytest.raises(SystemExit):
        hz.main(["--from-output", str(tmp_path / "other.txt")])
    assert "no table rows" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text(TABLE)
    hz.main(["--from-output", str(tmp_path / "t.txt")])
    assert capsys.readouterr().out.strip() == "CPU cost per episode, 40 vs 10 turns: whole history 4.00x, history_turns 4 3.50x"
