"""DPO / step-DPO: exact pairs from hand-made trajectories, prompt fitting, and a tiny training run."""

import pytest
import torch

from rl.models import tiny_model
from rl.trainers.dpo import (DPOStageConfig, first_divergence, fit_prompt, outcome_pairs, step_pairs,
                             train_dpo)
from rl.trajectory import Step, Trajectory

SYS = "Find the key, then open the door."


def traj(i, task, steps, outcome, progress=None, system=SYS):
    t = Trajectory(i, task, [Step(o, a, True) for o, a in steps], outcome=outcome, success=outcome >= 1.0,
                   system_prompt=system)
    if progress is not None:
        t.annotations["progress"] = list(progress)
    return t


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM_MSG = {"role": "system", "content": SYS}
# task A: a win and two losses parting from it at steps 1 and 0; task B: two wins (no pair);
# task C: the env showed different first observations (no shared state, no pair)
WIN = traj(0, "A", [("o0", "go north"), ("o1", "take key"), ("o2", "open door")], 1.0, [0.4, 0.4, 0.2])
LOSS1 = traj(1, "A", [("o0", "go north"), ("o1", "go south")], 0.0, [0.4, -0.2])
LOSS2 = traj(2, "A", [("o0", "go east")], 0.0, [0.1])
B1 = traj(3, "B", [("p0", "take key")], 1.0, [1.0])
B2 = traj(4, "B", [("p0", "open door")], 1.0, [0.0])
C1 = traj(5, "C", [("q0", "take key")], 1.0, [1.0])
C2 = traj(6, "C", [("q0'", "go west")], 0.0, [0.0])
ALL = [WIN, LOSS1, LOSS2, B1, B2, C1, C2]
LOSS1_STEPS = [("o0", "go north"), ("o1", "go south")]


def test_first_divergence():
    assert first_divergence(WIN, LOSS1) == 1
    assert first_divergence(WIN, LOSS2) == 0
    assert first_divergence(C1, C2) is None  # observation differs before any action does
    assert first_divergence(WIN, WIN) is None
    assert first_divergence(WIN, traj(9, "A", [("o0", "go north")], 0.0)) is None  # a prefix, no choice
    assert first_divergence(WIN, traj(9, "A", [("o0", "x")], 0.0, system="other")) is None


def test_outcome_pairs_at_first_differing_action():
    pairs = outcome_pairs(ALL)
    assert len(pairs) == 2
    p1, p2 = pairs
    assert p1["prompt"] == [SYSTEM_MSG, user("o0"), assistant("go north"), user("o1")]
    assert p1["chosen"] == [assistant("take key")] and p1["rejected"] == [assistant("go south")]
    assert (p1["task"], p1["step"], p1["margin"]) == ("A", 1, 1.0)
    assert p2["prompt"] == [SYSTEM_MSG, user("o0")]
    assert p2["chosen"] == [assistant("go north")] and p2["rejected"] == [assistant("go east")]
    # order of the inputs does not decide which side is chosen
    assert outcome_pairs([LOSS1, WIN]) == outcome_pairs([WIN, LOSS1])


def test_outcome_pairs_margin_dedupe_and_rest():
    assert outcome_pairs(ALL, min_margin=1.0) == []  # the gap must be strictly larger
    partial = traj(7, "A", [("o0", "go north"), ("o1", "go south")], 0.5)
    pairs = outcome_pairs([WIN, partial, LOSS2], min_margin=0.4)
    # (partial, LOSS2) parts at step 0 with the same prompt/chosen/rejected as (WIN, LOSS2): kept once
    assert [(p["step"], p["margin"]) for p in pairs] == [(1, 0.5), (0, 1.0)]
    assert pairs[0]["chosen"] == [assistant("take key")] and pairs[0]["rejected"] == [assistant("go south")]
    # a second identical loss gives the same pair: kept once
    assert len(outcome_pairs([WIN, LOSS1, traj(8, "A", LOSS1_STEPS, 0.0)])) == 1
    rest = outcome_pairs([WIN, LOSS1], completion="rest")[0]
    assert rest["chosen"] == [assistant("take key"), user("o2"), assistant("open door")]
    assert rest["rejected"] == [assistant("go south")]
    with pytest.raises(ValueError, match="dpo.completion"):
        outcome_pairs(ALL, completion="all")


def test_step_pairs_compare_mean_values_at_shared_histories():
    extra = traj(9, "A", [("o0", "go north"), ("o1", "go south")], 0.0, [0.1, -0.4])
    pairs = step_pairs([WIN, LOSS1, LOSS2, extra, B1, B2, C1, C2])
    got = {(p["task"], p["step"], p["chosen"][0]["content"], p["rejected"][0]["content"]): p["margin"]
           for p in pairs}
    assert len(pairs) == len(got) == 3
    # A, step 0: "go north" mean (0.4 + 0.4 + 0.1) / 3 = 0.3 vs "go east" 0.1
    assert got[("A", 0, "go north", "go east")] == pytest.approx(0.2)
    # A, step 1: "take key" 0.4 vs "go south" mean (-0.2 - 0.4) / 2 = -0.3
    assert got[("A", 1, "take key", "go south")] == pytest.approx(0.7)
    # B: both won, but progress tells the actions apart; C never shares a history
    assert got[("B", 0, "take key", "open door")] == pytest.approx(1.0)
    a1 = next(p for p in pairs if p["step"] == 1)
    assert a1["prompt"] == [SYSTEM_MSG, user("o0"), assistant("go north"), user("o1")]
    assert len(step_pairs([WIN, LOSS1, LOSS2, extra], min_margin=0.25)) == 1  # only the 0.7 gap


def test_step_pairs_require_the_annotation():
    with pytest.raises(ValueError, match="trajectory 3 has no annotations\\['q'\\]"):
        step_pairs([B1, B2], key="q")




def test_fit_prompt_drops_oldest_turns(tok):
    long = traj(0, "A", [(f"You walk north. The door is {k} steps south.", "go north") for k in range(6)]
                + [("The key is here.", "take key")], 1.0)
    other = traj(1, "A", [(s.observation, s.action) for s in long.steps[:6]] + [("The key is here.", "go west")],
                 0.0)
    pair = outcome_pairs([long, other])[0]
    assert len(pair["prompt"]) == 1 + 13
    assert fit_prompt(tok, pair, 4096) == pair
    full = len(tok.apply_chat_template(pair["prompt"] + pair["chosen"], tokenize=True, return_dict=True)["input_ids"])
    fitted = fit_prompt(tok, pair, full - 5)
    assert fitted["prompt"][0] == SYSTEM_MSG and fitted["prompt"][-1] == user("The key is here.")
    assert len(fitted["prompt"]) == 1 + 11  # one (observation, action) turn dropped
    assert fit_prompt(tok, pair, 10) is None


def completion_logp(model, tok, prompt, completion) -> float:
    p = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    assert full[: len(p)] == p
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return float(logp[torch.arange(len(p) - 1, len(full) - 1), ids[0, len(p):]].sum())


def margins(model, tok, pairs):
    return [completion_logp(model, tok, p["prompt"], p["chosen"])
            - completion_logp(model, tok, p["prompt"], p["rejected"]) for p in pairs]


def test_train_dpo_raises_the_chosen_rejected_margin(tok, tmp_path):
    model = tiny_model(tok, seed=0)
    pairs = outcome_pairs(ALL)
    before = margins(model, tok, pairs)
    logs = []
    cfg = DPOStageConfig(lr=1e-3, epochs=3, batch_size=2, beta=0.5, warmup_ratio=0.0)
    out = tmp_path / "dpo"
    model = train_dpo(cfg, model, tok, ALL, out, log_fn=lambda m, s: logs.append((s, m)))
    after = margins(model, tok, pairs)
    assert all(a > b + 0.5 for a, b in zip(after, before)), (before, after)
    steps = [m for _, m in logs if "dpo/loss" in m]
    assert len(steps) == 3
    assert steps[0]["dpo/loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert steps[-1]["dpo/rewards/margins"] > 0 and steps[-1]["dpo/loss"] < steps[0]["dpo/loss"]
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()


def test_train_dpo_step_pairs_with_lora_uses_the_disabled_adapter_as_reference(tok, tmp_path):
    from rl.models import ModelConfig, load_model

    model = load_model(ModelConfig(lora=True, lora_r=8, lora_alpha=32), tok)
    pairs = step_pairs(ALL)
    before = margins(model, tok, pairs)
    logs = []
    cfg = DPOStageConfig(pairs="step", lr=1e-2, epochs=3, batch_size=3, beta=0.5, warmup_ratio=0.0)
    model = train_dpo(cfg, model, tok, ALL, tmp_path / "dpo", log_fn=lambda m, s: logs.append(m))
    after = margins(model, tok, pairs)
    assert sum(after) / len(after) > sum(before) / len(before) + 0.5, (before, after)
    with model.disable_adapter():  # the reference TRL used: the base weights, untouched
        assert margins(model, tok, pairs) == pytest.approx(before, abs=1e-4)
    assert [m["dpo/loss"] for m in logs if "dpo/loss" in m][0] == pytest.approx(0.6931, abs=1e-3)
    assert (tmp_path / "dpo" / "config.json").exists()  # tiny base: saved merged


def test_train_dpo_rejects_bad_input(tok):
    model = tiny_model(tok)
    with pytest.raises(ValueError, match="dpo.pairs"):
        train_dpo(DPOStageConfig(pairs="pairs"), model, tok, ALL, None)
    with pytest.raises(ValueError, match="no preference pairs"):
        train_dpo(DPOStageConfig(), model, tok, [B1, B2], None)
    with pytest.raises(ValueError, match="dpo.batch_size"):
        train_dpo(DPOStageConfig(batch_size=0), model, tok, ALL, None)
