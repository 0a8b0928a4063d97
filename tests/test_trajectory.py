"""Token view of trajectories: masks, step ends, truncation, prompts, storage; two chat templates."""

import random

import pytest

from rl.models import load_tokenizer
from rl.trajectory import (
    Step, Trajectory, encode_conversation, load_trajectories, save_trajectories, tokenize_trajectory,
    truncate_view,
)

TEMPLATES = ["tiny", "tiny-llama3"]  # ChatML and Llama-3 style
END_OF_TURN = {"tiny": "<|im_end|>", "tiny-llama3": "<|eot_id|>"}

SYSTEM = "You are an agent in a grid of rooms. Reply with one action."
OBS = ["The key is here. The door is 2 steps east.", "You took the key.", "You walk east.",
       "Nothing happens: there is a wall to the north.", "You opened the door. You won."]
ACTIONS = ["take key", "go east", "go north", "Action: open door.\nI think so", "é ü — 42 ✓"]


@pytest.fixture(scope="module", params=TEMPLATES)
def tok(request):
    t = load_tokenizer(request.param)
    t.template_name = request.param
    return t


def _spans(view):
    """Runs of mask-1 tokens, as (start, end_inclusive)."""
    spans, start = [], None
    for i, m in enumerate(view.action_mask + [0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            spans.append((start, i - 1))
            start = None
    return spans


def _traj(n_steps, seed=0):
    rng = random.Random(seed)
    steps = [Step(OBS[i % len(OBS)], rng.choice(ACTIONS), valid=bool(i % 2), reward=0.0, info={"progress": i / 4})
             for i in range(n_steps)]
    return Trajectory(traj_id=seed, task=f"train-{seed}", steps=steps, outcome=1.0, success=True,
                      group_id=seed // 2, system_prompt=SYSTEM, final_observation="done",
                      stats={"turns": float(n_steps)}, annotations={"progress": [0.1] * n_steps})


def test_masked_tokens_decode_to_actions(tok):
    view = encode_conversation(tok, SYSTEM, OBS, ACTIONS[:4])
    spans = _spans(view)
    assert len(spans) == 4 == view.num_steps
    eot = tok.convert_tokens_to_ids(END_OF_TURN[tok.template_name])
    for (start, end), action, step_end in zip(spans, ACTIONS, view.step_ends):
        assert tok.decode(view.input_ids[start:end + 1], skip_special_tokens=True) == action
        assert end == step_end
        assert view.input_ids[step_end] == eot  # the end-of-turn token is generated, hence trained
        assert tok.decode(view.input_ids[start:end]) == action  # everything before it is the text
    # all masked tokens together are exactly the actions, nothing from the observations
    masked = [t for t, m in zip(view.input_ids, view.action_mask) if m]
    assert tok.decode(masked, skip_special_tokens=True) == "".join(ACTIONS[:4])
    assert len(view.input_ids) == len(view.action_mask)


def test_observation_tokens_are_masked_out(tok):
    view = encode_conversation(tok, SYSTEM, OBS[:3], ACTIONS[:3])
    unmasked = tok.decode([t for t, m in zip(view.input_ids, view.action_mask) if not m])
    for obs in OBS[:3]:
        assert obs in unmasked
    assert SYSTEM in unmasked
    for obs in OBS[:3]:
        for start, end in _spans(view):
            assert obs not in tok.decode(view.input_ids[start:end + 1])
    # the rendered template text (role headers) is never in the loss
    assert "assistant" not in tok.decode([t for t, m in zip(view.input_ids, view.action_mask) if m])


def test_token_view_equals_template_tokenisation_text(tok):
    """Segment-wise tokenisation renders back to the chat template's text."""
    msgs_view = encode_conversation(tok, SYSTEM, OBS[:3], ACTIONS[:2], add_generation_prompt=True)
    from rl.trajectory import build_messages

    text = tok.apply_chat_template(build_messages(SYSTEM, OBS[:3], ACTIONS[:2]), tokenize=False,
                                   add_generation_prompt=True)
    assert tok.decode(msgs_view.input_ids) == text
    assert sum(msgs_view.action_mask) == sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1
                                             for a in ACTIONS[:2])


@pytest.mark.parametrize("n", [1, 2, 5])
def test_rollout_prompt_is_prefix_of_trajectory_view(tok, n):
    full = encode_conversation(tok, SYSTEM, OBS[:n], ACTIONS[:n])  # as tokenize_trajectory builds it
    for t in range(n):
        prompt = encode_conversation(tok, SYSTEM, OBS[: t + 1], ACTIONS[:t], add_generation_prompt=True)
        assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids
        # the next tokens are exactly the generated action and its end-of-turn token
        start = len(prompt.input_ids)
        assert full.action_mask[start] == 1 and full.action_mask[start - 1] == 0
        assert full.step_ends[t] + 1 - start == len(tok(ACTIONS[t], add_special_tokens=False)["input_ids"]) + 1
        assert prompt.step_ends == full.step_ends[:t]


def test_truncation_never_cuts_an_action(tok):
    for seed in range(3):
        traj = _traj(5, seed)
        full = tokenize_trajectory(tok, traj)
        spans = _spans(full)
        for max_len in range(0, len(full.input_ids) + 3):
            view = truncate_view(full, max_len)
            assert len(view.input_ids) <= max_len
            assert view.input_ids == full.input_ids[: len(view.input_ids)]
            # kept steps are whole: every kept span is a full span of the original
            assert _spans(view) == spans[: view.num_steps]
            assert view.step_ends == full.step_ends[: view.num_steps]
            # maximal: the next step would not have fitted
            if view.num_steps < full.num_steps:
                assert full.step_ends[view.num_steps] >= max_len
            if max_len >= len(full.input_ids):
                assert view == full
            assert tokenize_trajectory(tok, traj, max_length=max_len or None).num_steps == (
                view.num_steps if max_len else full.num_steps)


def test_empty_action_keeps_end_of_turn_in_loss(tok):
    view = encode_conversation(tok, SYSTEM, OBS[:2], [""])
    assert sum(view.action_mask) == 1  # only the end-of-turn token
    assert view.action_mask[view.step_ends[0]] == 1
    assert tok.convert_ids_to_tokens(view.input_ids[view.step_ends[0]]) == END_OF_TURN[tok.template_name]


def test_save_load_round_trip(tmp_path):
    trajs = [_traj(n, seed) for seed, n in enumerate([1, 3, 5])]
    trajs[1].failed = "step: TimeoutError"
    save_trajectories(trajs, tmp_path / "trajs")
    loaded = load_trajectories(tmp_path / "trajs")
    assert [t.to_dict() for t in loaded] == [t.to_dict() for t in trajs]
    assert isinstance(loaded[0].steps[0], Step)
    # overwriting in place works (the atomic rename replaces the old dataset)
    save_trajectories(trajs[:1], tmp_path / "trajs")
    assert len(load_trajectories(tmp_path / "trajs")) == 1
    assert not (tmp_path / "trajs.tmp").exists()
    # JSONL
    import json

    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(t.to_dict()) for t in trajs) + "\n")
    assert [t.to_dict() for t in load_trajectories(tmp_path / "t.jsonl")] == [t.to_dict() for t in trajs]


def test_window_start_drops_the_oldest_k_turns_at_once():
    from rl.trajectory import window_start, windowed_context

    assert [window_start(i, 2) for i in range(8)] == [0, 0, 0, 0, 2, 2, 4, 4]
    assert [window_start(i, 3) for i in range(10)] == [0] * 6 + [3] * 3 + [6]
    assert [window_start(i, 0) for i in range(5)] == [0] * 5
    obs, acts = [f"o{i}" for i in range(7)], [f"a{i}" for i in range(6)]
    assert windowed_context(obs, acts, 3, 2) == (["o0", "o1", "o2", "o3"], ["a0", "a1", "a2"])
    # step 5, k=2: first observation, then turns 2..4 (a2 -> o3, a3 -> o4, a4 -> o5)
    assert windowed_context(obs, acts, 5, 2) == (["o0", "o3", "o4", "o5"], ["a2", "a3", "a4"])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_windowed_token_view_scores_each_action_in_its_rollout_context(tok, k):
    """Every step is trained in exactly one sequence, preceded by exactly the prompt the rollout
    generated it from (system + first observation + its window), with exact masks."""
    from rl.trajectory import tokenize_windows, windowed_context

    obs = OBS + ["You walk west.", "You walk south."]
    acts = ACTIONS + ["go west", "go south"]
    traj = Trajectory(0, "t", [Step(o, a, True) for o, a in zip(obs, acts)], 1.0, True, system_prompt=SYSTEM)
    blocks = tokenize_windows(tok, traj, k)
    assert [first for _, first in blocks] == sorted({0, *range(2 * k, len(acts), k)})
    assert sum(v.num_steps for v, _ in blocks) == len(acts)
    eot = END_OF_TURN[tok.template_name]
    for view, first in blocks:
        spans = _spans(view)
        assert len(spans) == view.num_steps and [e for _, e in spans] == view.step_ends
        for j, (start, end) in enumerate(spans):
            step = first + j
            prompt = encode_conversation(tok, SYSTEM, *windowed_context(obs, acts, step, k), True).input_ids
            assert view.input_ids[:start] == prompt, (k, step)
            assert tok.decode(view.input_ids[start:end + 1]) == acts[step] + eot
    # no window: one sequence, the usual view
    (full, first), = tokenize_windows(tok, traj, 0)
    assert first == 0 and full == tokenize_trajectory(tok, traj)
    # a max_length cut keeps whole steps and ends the list
    cut = tokenize_windows(tok, traj, k, max_length=blocks[0][0].step_ends[-1])
    assert len(cut) == 1 and cut[0][0].num_steps == blocks[0][0].num_steps - 1
