"""SFT on action tokens only: labels, the loss formula, zero gradient from observations, learning."""

import copy
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rl.models import ModelConfig, load_model, load_tokenizer, tiny_model
from rl.trainers.sft import (IGNORE_INDEX, SFTConfig, action_nll, fit_examples, masked_token_nll, sft_examples,
                             train_sft)
from rl.trajectory import Step, Trajectory, encode_conversation, tokenize_trajectory, tokenize_windows

SYSTEM = "You are an agent in a grid of rooms."


def demo(i: int, pairs: list[tuple[str, str]]) -> Trajectory:
    steps = [Step(obs, act, True) for obs, act in pairs]
    return Trajectory(i, f"train-{i}", steps, outcome=1.0, success=True, system_prompt=SYSTEM)


DEMOS = [
    demo(0, [("The key is here.", "take key"), ("You hold the key. The door is here.", "open door")]),
    demo(1, [("There is a wall to the north.", "go south")]),
    demo(2, [("The door is 3 steps south.", "go south"), ("You walk south.", "go south"),
             ("You walk south. The door is here.", "open door")]),
]




def test_labels_are_exactly_the_actions(tok):
    rows = sft_examples(tok, DEMOS, max_length=512)
    assert len(rows) == 3
    for row, traj in zip(rows, DEMOS):
        assert len(row["labels"]) == len(row["input_ids"])
        assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(row["labels"], row["input_ids"]))
        kept = [lab for lab in row["labels"] if lab != IGNORE_INDEX]
        # each action is followed by the end-of-turn token the policy must learn to emit
        assert tok.decode(kept) == "".join(s.action + "<|im_end|>" for s in traj.steps)


def test_truncation_keeps_whole_steps_and_rejects_empty(tok):
    full = sft_examples(tok, DEMOS[:1], max_length=512)[0]
    first_end = next(i for i, lab in enumerate(full["labels"]) if lab == tok.eos_token_id)
    cut = sft_examples(tok, DEMOS[:1], max_length=first_end + 3)[0]
    assert tok.decode([lab for lab in cut["labels"] if lab != IGNORE_INDEX]) == "take key<|im_end|>"
    with pytest.raises(ValueError, match="max_length=5"):
        sft_examples(tok, DEMOS, max_length=5)


def test_history_window_clones_each_action_in_its_rollout_context(tok):
    """With rollout.history_turns = k the policy acts on windowed prompts: SFT rows are the RL
    trainer's windowed sequences (tokenize_windows) and each action is labelled exactly once."""
    long = demo(3, [(f"Room {i}.", f"go {d}") for i, d in enumerate(["north", "east", "south", "west", "north"])])
    rows = sft_examples(tok, [long], max_length=512, history_turns=1)
    # k = 1: steps 0-1 share the full prompt, then every step starts its own window
    assert len(rows) == 4
    views = [v for v, _ in tokenize_windows(tok, long, 1, 512)]
    assert [r["input_ids"] for r in rows] == [v.input_ids for v in views]
    kept = [tok.decode([lab for lab in r["labels"] if lab != IGNORE_INDEX]) for r in rows]
    assert kept == ["go north<|im_end|>go east<|im_end|>", "go south<|im_end|>", "go west<|im_end|>",
                    "go north<|im_end|>"]
    # the last row's prompt is the rollout's at step 4: first observation, then action 3 and observation 4
    text = tok.decode(rows[-1]["input_ids"])
    assert "Room 0." in text and "go west" in text and "Room 4." in text
    assert "Room 1." not in text and "Room 3." not in text
    # k = 0 (no window): one row, the whole trajectory's view
    whole = tokenize_trajectory(tok, long, 512)
    assert [r["input_ids"] for r in sft_examples(tok, [long], 512, history_turns=0)] == [whole.input_ids]


def test_masked_token_nll_hand_computed():
    # position 0 predicts labels[1] with probs [1/4, 3/4]; position 1 predicts labels[2] with [1/2, 1/2]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]], requires_grad=True)
    loss = masked_token_nll(logits, torch.tensor([[IGNORE_INDEX, 1, 0]]))
    assert loss.item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2, rel=1e-6)
    only_first = masked_token_nll(logits, torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]]))
    assert only_first.item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    only_first.backward()
    # no gradient reaches logits whose next token is outside the loss, nor the last position
    assert torch.all(logits.grad[0, 1:] == 0) and torch.any(logits.grad[0, 0] != 0)


def test_logged_loss_is_token_mean_over_action_tokens(tok):
    model = tiny_model(tok, seed=3)
    with torch.no_grad():  # sharper logits than at init, so token NLLs differ from log(V)
        model.model.embed_tokens.weight.mul_(20.0)
    before = copy.deepcopy(model)
    logs = []
    cfg = SFTConfig(lr=0.0, epochs=1, batch_size=3, warmup_ratio=0.0)
    train_sft(cfg, model, tok, DEMOS, None, log_fn=lambda m, s: logs.append((s, m)))
    step, first = logs[0]
    assert step == 1
    rows = sft_examples(tok, DEMOS, 512)
    with torch.no_grad():
        sums, count, all_tokens, seq_means = 0.0, 0, [], []
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            logits = before(input_ids=ids).logits
            sums += masked_token_nll(logits, labels).item() * n
            count += n
            seq_means.append(masked_token_nll(logits, labels).item())
            all_tokens.append(masked_token_nll(logits, ids).item())
    reference = sums / count
    assert first["sft/loss"] == pytest.approx(reference, rel=1e-5)
    # sanity: the alternatives (all tokens; mean of per-sequence means) miss by 100x the tolerance
    assert abs(sum(all_tokens) / 3 - reference) > 1e-3 * reference
    assert abs(sum(seq_means) / 3 - reference) > 1e-3 * reference


def _train_rows(tok, rows, steps=2):
    model = tiny_model(tok, seed=1)
    cfg = SFTConfig(lr=1e-2, epochs=steps, batch_size=len(rows), warmup_ratio=0.0, lr_scheduler="constant")
    return fit_examples(cfg, model, tok, rows, None).state_dict()


def test_tokens_after_last_action_contribute_no_gradient(tok):
    rows = sft_examples(tok, DEMOS, 512)
    g = torch.Generator().manual_seed(0)
    extra = [torch.randint(10, len(tok) - 10, (7,), generator=g).tolist() for _ in rows]
    perturbed = [{"input_ids": r["input_ids"] + e, "labels": r["labels"] + [IGNORE_INDEX] * 7}
                 for r, e in zip(rows, extra)]
    leaky = [{"input_ids": r["input_ids"] + e, "labels": r["labels"] + e} for r, e in zip(rows, extra)]
    clean_w, perturbed_w, leaky_w = (_train_rows(tok, r) for r in (rows, perturbed, leaky))
    # float noise only: longer rows change the matmul blocking, and Adam's normalised step can turn
    # a ~1e-9 gradient difference into ~3e-5 on a weight (seen once); the control below moves 1e-3
    for name in clean_w:
        torch.testing.assert_close(perturbed_w[name], clean_w[name], atol=1e-4, rtol=1e-4)
    # control: the same extra tokens with labels do move the weights
    assert max((leaky_w[n] - clean_w[n]).abs().max().item() for n in clean_w) > 1e-3


def greedy_action(model, tok, obs: str) -> str:
    prompt = encode_conversation(tok, SYSTEM, [obs], [], add_generation_prompt=True).input_ids
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(prompt):], skip_special_tokens=True).strip()


def test_tiny_model_learns_expert_actions_and_is_saved(tok, tmp_path):
    torch.manual_seed(0)
    demos = [demo(0, [("The key is here.", "take key")]), demo(1, [("The door is here.", "open door")]),
             demo(2, [("There is a wall to the north.", "go south")])]
    model = tiny_model(tok, seed=0)
    logs = []
    cfg = SFTConfig(lr=5e-3, epochs=50, batch_size=3, warmup_ratio=0.0)
    out = tmp_path / "sft" / "model"
    model = train_sft(cfg, model, tok, demos, out, log_fn=lambda m, s: logs.append(m))
    losses = [m["sft/loss"] for m in logs if "sft/loss" in m]
    assert losses[-1] < losses[0] / 10
    model.eval()
    for traj in demos:
        assert greedy_action(model, tok, traj.steps[0].observation) == traj.steps[0].action
    assert action_nll(model, tok, demos) < 0.3

    from transformers import AutoModelForCausalLM

    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    assert not out.with_name("model.tmp").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([sft_examples(tok, demos, 512)[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert load_tokenizer(str(out))("take key")["input_ids"] == tok("take key")["input_ids"]


def test_lora_saves_adapter_or_merged_weights_that_reload(tok, tmp_path):
    cfg = SFTConfig(lr=1e-2, epochs=1, batch_size=3, warmup_ratio=0.0)
    ids = torch.tensor([sft_examples(tok, DEMOS, 512)[1]["input_ids"]])
    # base on disk: only the adapter is written, and it reloads onto that base
    base_dir = tmp_path / "base"
    tiny_model(tok).save_pretrained(base_dir)
    model = train_sft(cfg, load_model(ModelConfig(path=str(base_dir), lora=True, lora_r=4), tok), tok, DEMOS,
                      tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    reloaded = load_model(ModelConfig(path=str(tmp_path / "adapter")), tok)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # built-in tiny base (nowhere on disk): merged full weights are written instead
    model = train_sft(cfg, load_model(ModelConfig(lora=True, lora_r=4), tok), tok, DEMOS, tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    reloaded = load_model(ModelConfig(path=str(tmp_path / "merged")), tok)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_bad_config_fails_early_naming_the_key(tok):
    model = tiny_model(tok)
    with pytest.raises(ValueError, match="sft.epochs"):
        train_sft(SFTConfig(epochs=0), model, tok, DEMOS, None)
    with pytest.raises(ValueError, match="sft.warmup_ratio"):
        train_sft(SFTConfig(warmup_ratio=1.5), model, tok, DEMOS, None)
    failed = [Trajectory(9, "t", [Step("o", "a", True)], 0.0, False)]
    with pytest.raises(ValueError, match="only_successful"):
        train_sft(SFTConfig(only_successful=True), model, tok, failed, None)


def test_pipeline_accelerator_keeps_its_settings(tok):
    from accelerate import Accelerator

    acc = Accelerator(gradient_accumulation_steps=3)
    logs = []
    train_sft(SFTConfig(epochs=1, batch_size=1, grad_accum_steps=3), tiny_model(tok), tok, DEMOS, None,
              accelerator=acc, log_fn=lambda m, s: logs.append((s, m)))
    assert [s for s, m in logs if "sft/loss" in m] == [1]  # 3 trajectories, 3 micro-batches: 1 step
    assert acc.gradient_accumulation_steps == 3 and acc.gradient_state.num_steps == 3


DDP_SCRIPT = """
import json, sys, torch
from rl.models import load_tokenizer, tiny_model
from rl.train import leave_process_group
from rl.trainers.sft import SFTConfig, train_sft
sys.path.insert(0, {tests!r})
from test_sft import DEMOS
tok = load_tokenizer("tiny")
logs = []
cfg = SFTConfig(lr=0.0, epochs=1, batch_size=1, warmup_ratio=0.0)
train_sft(cfg, tiny_model(tok, seed=3), tok, DEMOS[:2], {out!r}, log_fn=lambda m, s: logs.append(m))
if logs:  # main process only
    open({out!r} + ".json", "w").write(json.dumps(dict(logs[0], world_size=torch.distributed.get_world_size())))
torch.distributed.barrier()
leave_process_group()
"""


@pytest.mark.slow
def test_accelerate_launch_two_processes_gives_global_token_mean(tok, tmp_path):
    """Under `accelerate launch --num_processes 2 --cpu`, each rank gets one trajectory; the logged
    loss is the token mean over both ranks' action tokens (not the mean of the two ranks' means)."""
    out = str(tmp_path / "model")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=out)))
    root = Path(__file__).resolve().parents[1]
    import socket

    with socket.socket() as sock:  # a free port, so parallel runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # launch/cpu_2proc.yaml: torchrun launcher + ACCELERATE_USE_CPU=1 gives two gloo processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "launch" / "cpu_2proc.yaml"),
           "--main_process_port", str(port), str(script)]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    logged = json.loads(Path(out + ".json").read_text())
    assert logged["world_size"] == 2
    logged = logged["sft/loss"]
    model = tiny_model(tok, seed=3)
    rows = sft_examples(tok, DEMOS[:2], 2048)
    sums, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            sums += masked_token_nll(model(input_ids=torch.tensor([row["input_ids"]])).logits, labels).item() * n
            count += n
    assert logged == pytest.approx(sums / count, rel=1e-5)
    assert (Path(out) / "config.json").exists()
