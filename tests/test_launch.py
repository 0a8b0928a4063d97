"""accelerate/DeepSpeed configs in launch/ and a real 2-process CPU PPO run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TIMING = {"tokens_per_s", "rollout_time", "score_time", "update_time"}


def load(name):
    return yaml.safe_load((LAUNCH / name).read_text())


def test_every_config_parses_into_accelerates_cluster_config():
    from accelerate.commands.config.config_args import ClusterConfig

    names = sorted(p.name for p in LAUNCH.glob("*.yaml"))
    assert names == ["cpu.yaml", "cpu_2proc.yaml", "gpu.yaml", "multi_gpu.yaml", "multi_node.yaml",
                     "zero2.yaml", "zero2_offload.yaml", "zero3.yaml", "zero3_offload.yaml"]
    for name in names:
        cfg = ClusterConfig.from_yaml_file(str(LAUNCH / name))
        assert cfg.num_processes >= 1, name


@pytest.mark.parametrize("name,stage,opt,param", [
    ("zero2.yaml", 2, "none", "none"), ("zero2_offload.yaml", 2, "cpu", "none"),
    ("zero3.yaml", 3, "none", "none"), ("zero3_offload.yaml", 3, "cpu", "cpu"),
    ("multi_node.yaml", 2, "none", "none"),
])
def test_deepspeed_configs(name, stage, opt, param):
    cfg = load(name)
    ds = cfg["deepspeed_config"]
    assert cfg["distributed_type"] == "DEEPSPEED"
    assert (ds["zero_stage"], ds["offload_optimizer_device"], ds["offload_param_device"]) == (stage, opt, param)
    # the trainer sets accumulation itself (rl.grad_accum_steps): accelerate rejects "auto" here and
    # a number would override the recipe
    assert "gradient_accumulation_steps" not in ds and ds["gradient_clipping"] == "auto"


def test_cpu_configs_and_multi_node_example():
    assert load("cpu.yaml")["use_cpu"] and load("cpu.yaml")["num_processes"] == 1
    two = load("cpu_2proc.yaml")
    # accelerate's torchrun launcher; the processes join as MULTI_CPU (see the file's comment)
    assert (two["distributed_type"], two["num_processes"], two["use_cpu"]) == ("MULTI_GPU", 2, True)
    node = load("multi_node.yaml")
    assert node["num_machines"] == 2 and node["main_process_ip"] and node["main_process_port"]
    assert load("multi_gpu.yaml")["distributed_type"] == "MULTI_GPU"


@pytest.mark.slow
def test_two_process_cpu_ppo_run_sees_one_global_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "cpu_2proc.yaml"),
           "--main_process_port", "29517", str(ROOT / "tests" / "ppo_2proc_script.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)  # DDP kept weights in sync
    seen0, seen1 = ranks[0]["seen"], ranks[1]["seen"]
    assert [(s["stage"], s["step"]) for s in seen0] == [("rl", 1), ("rl", 2), ("eval", 2)]
    for a, b in zip(seen0, seen1):
        for key in a:
            if key not in TIMING and not key.endswith(("_time", "_peak_rss_gib")):
                assert a[key] == pytest.approx(b[key], abs=1e-6, nan_ok=True), key
    assert seen0[0]["action_tokens"] > 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("rl", 1), ("rl", 2), ("eval", 2)]  # written once
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1", "step_2"]
