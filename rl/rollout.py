"""Rollout engine: N envs stepped in lockstep, one batched generation call per turn.

Episodes are (task, repeat) pairs in a queue. `cfg.num_envs` slots each hold one env; every turn
the engine generates the replies of all active slots in ONE call, parses them, steps the envs
(each call in a worker thread with a timeout) and refills finished slots from the queue.

Cost per turn is linear in the new text, not in the whole history:
- Prompt token ids are kept per slot and extended by the new segment only (the action
  re-tokenised as the trajectory view stores it, then the observation and generation prompt).
  The ids equal `encode_conversation(..., add_generation_prompt=True)` (tested); a template that
  does not render a conversation's prefix as a prefix falls back to the full encoding.
- HF backend with `reuse_cache=True`: the KV cache of last turn's prompts is kept and only the
  new tokens are fed, left-padded, so the attention mask has holes; positions come from the
  mask's cumulative sum, so every token sees the same positions and keys as in a fresh prefill.
  The generated tokens' KV is cropped (the next prompt holds the re-tokenised action, exactly
  what the trainer scores). Rows are selected as episodes end; the cache is rebuilt when it
  would exceed twice the longest prompt (holes pile up when slots restart). Greedy outputs equal
  the no-reuse path (tested).
- A fresh batch whose rows share a prompt (the G rollouts of a task, started together) encodes
  each distinct prompt once and copies its KV to the rows that share it.
- `bucket_prefill`: left-padding a turn's new tokens to the longest row pays for the padding,
  and the longest row is often a slot that just restarted with a whole first prompt (TextWorld:
  ~250 tokens against increments of ~70). The new tokens are then encoded in length buckets
  (`length_buckets`: fewest padded positions plus a per-forward cost), each on a copy of its
  rows' cache, and the rows are reassembled right-aligned in one cache for generate.
  `prefill_tokens` / `prefill_positions` count the real tokens and the positions computed.
- `history_turns=k`: the prompt keeps the system prompt, the first observation and the last k to
  2k-1 turns (`rl.trajectory.window_start`); within a window block it is extended as above, and
  when the window drops its oldest k turns it is encoded afresh (the cache row restarts), so a
  long episode costs O(turns) with prompts bounded by the window.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from rl.trajectory import Step, Trajectory, build_messages, encode_conversation, windowed_context

INVALID_REPLY = "Your reply is not a valid action. "  # prefixed to the repeated observation


@dataclass
class RolloutConfig:
    max_turns: int = 10  # replies per episode (valid or not) before it is cut (truncated)
    max_new_tokens: int = 32  # generation budget per reply
    temperature: float = 1.0  # sampling temperature (0 or greedy=True: argmax); RL log-probs use it too
    top_p: float = 1.0  # nucleus sampling mass (1: off)
    top_k: int = 0  # top-k sampling (0: off)
    stop_strings: list[str] = field(default_factory=list)  # a reply ends before the first of these
    num_envs: int = 8  # envs stepped in lockstep = generation batch size
    step_timeout_s: float = 30.0  # an env reset/step running longer fails the episode (<=0: none)
    backend: str = "hf"  # "hf" (transformers generate) | "vllm" (CUDA + vllm installed)
    max_prompt_tokens: int = 2048  # an episode whose prompt grows past this ends (truncated)
    reuse_cache: bool = True  # HF: keep the KV cache across turns, feed only new tokens
    # prompt = system prompt + first observation + the last k..2k-1 turns (0: the whole history);
    # the oldest k turns go at once, see rl.trajectory.window_start. RL must tokenize with the same k
    history_turns: int = 0
    # HF: fold a LoRA adapter into the fp32 base weights while generating (rl.models.lora_merged)
    merge_lora: bool = True
    # HF + reuse_cache: encode each turn's new prompt tokens in length buckets instead of one
    # batch left-padded to the longest (a restarted slot's whole first prompt, or the longest
    # observation); "auto": on a CPU for models of 10M+ parameters, where every padded position
    # costs compute; off on a GPU and for tiny models (the copies of the cache outweigh the saving)
    bucket_prefill: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"rollout.backend={self.backend!r}: choose 'hf' or 'vllm'")
        for key in ("max_turns", "max_new_tokens", "num_envs", "max_prompt_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"rollout.{key}={getattr(self, key)}: must be >= 1")
        if self.bucket_prefill not in ("auto", "on", "off"):
            raise ValueError(f"rollout.bucket_prefill={self.bucket_prefill!r}: choose 'auto', 'on' or 'off'")
        if self.history_turns < 0:
            raise ValueError(f"rollout.history_turns={self.history_turns}: must be >= 0 (0: the whole history)")
        if not 0.0 < self.top_p <= 1.0 or self.temperature < 0 or self.top_k < 0:
            raise ValueError("rollout: need 0 < top_p <= 1, temperature >= 0, top_k >= 0")


# ---------------------------------------------------------------------------------------------
# Generation backends: generate(prompts, slots, seed) -> generated token ids per prompt.


def _left_pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(model_eos if isinstance(model_eos, list) else [model_eos])
    return sorted(i for i in ids if i is not None)


# A forward's fixed cost (per-layer kernel launches, Python) in prompt tokens' worth of compute on a
# CPU: a bucket is split off only when it saves more padded positions than this.
BUCKET_OVERHEAD_TOKENS = 64
BUCKET_MIN_PARAMS = 10_000_000  # bucket_prefill="auto" buckets only for models at least this big


def length_buckets(lengths: list[int], overhead: int = BUCKET_OVERHEAD_TOKENS) -> list[list[int]]:
    """Partition row indices into buckets minimising sum(overhead + rows x longest) over buckets
    (exact: a DP over the rows sorted by length, where an optimal bucket is a contiguous run).
    Rows of length 0 need no forward and form no bucket."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: lengths[i])
    best, cut = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):  # bucket = order[i:j], its longest is order[j-1]
            c = best[i] + overhead + (j - i) * lengths[order[j - 1]]
            if c < best[j]:
                best[j], cut[j] = c, i
    buckets, j = [], len(order)
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


class HFBackend:
    """`model.generate` on left-padded prompts, optionally reusing the KV cache across turns."""

    def __init__(self, model, tokenizer, cfg: RolloutConfig, greedy: bool):
        import inspect

        from transformers import GenerationConfig

        self.model, self.tokenizer, self.reuse = model, tokenizer, cfg.reuse_cache
        # auto: where padded positions cost compute, i.e. on a CPU and for a model whose matmuls
        # outweigh a forward's fixed cost (not the 0.16M-parameter tiny model: slower there)
        self.bucket = cfg.bucket_prefill == "on" or (
            cfg.bucket_prefill == "auto" and model.device.type == "cpu"
            and sum(p.numel() for p in model.parameters()) >= BUCKET_MIN_PARAMS)
        self.eos = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        sample = not greedy and cfg.temperature > 0
        self.gen_cfg = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens, do_sample=sample, eos_token_id=self.eos,
            pad_token_id=self.pad_id, stop_strings=list(cfg.stop_strings) or None,
            **(dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k) if sample else {}),
        )
        # transformers 5 renamed generate's `past_key_values` to `cache` (peft wraps the base model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.prepare_inputs_for_generation).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.forward_cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.cache = None  # DynamicCache of the last call's prompts (rows = self.rows)
        self.rows: list[int] = []  # slot held by each cache row
        self.mask = None  # (R, Lc) attention mask of the cached positions (0 = hole/pad)
        self.cached: dict[int, list[int]] = {}  # slot -> prompt ids whose KV is in its row
        self.calls = 0  # generate calls made (one per turn)
        self.shared_rows = 0  # prompt rows whose prefill was copied from an equal prompt's
        self.prefill_tokens = 0  # prompt tokens fed to the model (real ones)
        self.prefill_positions = 0  # positions the prefill forwards computed (real + padding)

    def _encode(self, new_ids, mask, cache) -> None:
        """Append `new_ids` (left-padded) to `cache` in one forward, the LM head on one position
        only; `mask` covers the cached and the new positions, and positions count real tokens
        only (left padding and holes skipped), as generate's own prefill does."""
        dev = self.model.device
        pos = (mask.cumsum(1) - 1).clamp(min=0)[:, mask.shape[1] - new_ids.shape[1]:]
        self.model(input_ids=new_ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                   use_cache=True, logits_to_keep=1, **{self.forward_cache_kw: cache})
        self.prefill_positions += new_ids.numel()
        self.prefill_tokens += int(mask[:, mask.shape[1] - new_ids.shape[1]:].sum())

    def _last_token_inputs(self, mask, last_ids: list[int], cache):
        """(ids, mask, cache) for generate when `cache` holds every row's prompt but its last
        token: generate then feeds only that token."""
        import torch

        ids = torch.cat([torch.full(mask.shape, self.pad_id, dtype=torch.long), torch.tensor([[t] for t in last_ids])], 1)
        return ids, torch.cat([mask, torch.ones(len(last_ids), 1, dtype=torch.long)], 1), cache

    def _shared_prefill(self, prompts: list[list[int]]):
        """A fresh batch in which rows share a prompt (the G rollouts of a task start alike):
        encode each distinct prompt once, all but its last token, and copy its KV to the rows
        that share it; generate then feeds each row only its last prompt token. None when every
        prompt is distinct."""
        import torch
        from transformers import DynamicCache

        distinct: dict[tuple, int] = {}
        rows = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        if len(distinct) == len(prompts) or min(len(p) for p in prompts) < 2:
            return None
        heads, head_mask = _left_pad([list(p[:-1]) for p in distinct], self.pad_id)
        cache = DynamicCache()
        self._encode(heads, head_mask, cache)
        cache.batch_select_indices(torch.tensor(rows, device=self.model.device))
        self.shared_rows += len(prompts) - len(distinct)
        return self._last_token_inputs(head_mask[rows], [p[-1] for p in prompts], cache)

    def _bucketed_prefill(self, news: list[list[int]], old_mask):
        """Encode every row's new tokens but its last, bucket by bucket (`length_buckets`), on a
        copy of the cached rows, and return (ids, mask, cache) with each row's KV right-aligned in
        one cache, so generate feeds only the last token of each row. Padding then costs
        positions only within a bucket. None when one bucket would do (the plain path is then
        the same work without the copies) or the cache is not a plain per-layer KV."""
        import torch
        from transformers import DynamicCache

        heads = [n[:-1] for n in news]
        lengths = [len(h) for h in heads]
        buckets = length_buckets(lengths, BUCKET_OVERHEAD_TOKENS)
        layers = self.cache.layers
        if len(buckets) < 2 or any(type(lay).__name__ != "DynamicLayer" or lay.keys is None for lay in layers):
            return None
        dev, R, W, H = self.model.device, len(news), old_mask.shape[1], max(lengths)
        keys = [lay.keys.new_zeros(R, lay.keys.shape[1], W + H, lay.keys.shape[3]) for lay in layers]
        values = [lay.values.new_zeros(R, lay.values.shape[1], W + H, lay.values.shape[3]) for lay in layers]
        mask = torch.zeros(R, W + H, dtype=torch.long)
        done = set()
        for rows in buckets:
            idx = torch.tensor(rows, device=dev)
            sub = DynamicCache()
            for i, lay in enumerate(layers):
                sub.update(lay.keys[idx], lay.values[idx], i)
            ids, new_mask = _left_pad([heads[r] for r in rows], self.pad_id)
            sub_mask = torch.cat([old_mask[rows], new_mask], 1)
            self._encode(ids, sub_mask, sub)
            h = ids.shape[1]  # the bucket's KV goes to the last W + h positions; the gap is a hole
            for i, lay in enumerate(sub.layers):
                keys[i][idx, :, H - h:] = lay.keys
                values[i][idx, :, H - h:] = lay.values
            mask[rows, H - h:] = sub_mask
            done.update(rows)
        rest = [r for r in range(R) if r not in done]  # no new token before the last one
        if rest:
            idx = torch.tensor(rest, device=dev)
            for i, lay in enumerate(layers):
                keys[i][idx, :, H:] = lay.keys[idx]
                values[i][idx, :, H:] = lay.values[idx]
            mask[rest, H:] = old_mask[rest]
        del layers
        self.cache = None  # the old cache's rows now live in `keys`/`values`: free it before decoding
        cache = DynamicCache()
        for i in range(len(keys)):
            cache.update(keys[i], values[i], i)
        return self._last_token_inputs(mask, [n[-1] for n in news], cache)

    def _inputs(self, prompts: list[list[int]], slots: list[int]):
        """(input_ids, attention_mask, cache) for this call: incremental when the cache allows."""
        import torch
        from transformers import DynamicCache

        if self.reuse and self.cache is not None and all(s in self.rows for s in slots):
            news, restart = [], []
            for s, p in zip(slots, prompts):
                c = self.cached[s]
                ok = len(c) < len(p) and p[: len(c)] == c
                news.append(p[len(c):] if ok else p)
                restart.append(not ok)
            width = self.mask.shape[1] + max(len(n) for n in news)
            if width <= 2 * max(len(p) for p in prompts):
                idx = [self.rows.index(s) for s in slots]
                if idx != list(range(len(self.rows))):
                    self.cache.batch_select_indices(torch.tensor(idx, device=self.model.device))
                old_mask = self.mask[idx].clone()
                old_mask[torch.tensor(restart)] = 0  # a new episode in this slot: forget the row
                if self.bucket and (bucketed := self._bucketed_prefill(news, old_mask)) is not None:
                    return bucketed
                new_ids, new_mask = _left_pad(news, self.pad_id)
                old_ids = torch.full(old_mask.shape, self.pad_id, dtype=torch.long)
                return torch.cat([old_ids, new_ids], 1), torch.cat([old_mask, new_mask], 1), self.cache
        if self.reuse and (shared := self._shared_prefill(prompts)) is not None:
            return shared
        ids, mask = _left_pad(prompts, self.pad_id)
        return ids, mask, (DynamicCache() if self.reuse else None)

    def generate(self, prompts: list[list[int]], slots: list[int], seed: int) -> list[list[int]]:
        import torch

        self.calls += 1
        dev = self.model.device
        with torch.no_grad():
            ids, mask, cache = self._inputs(prompts, slots)
            cached = cache.get_seq_length() if cache is not None else 0
            self.prefill_positions += ids[:, cached:].numel()  # generate's own prefill of the rest
            self.prefill_tokens += int(mask[:, cached:].sum())
            ids, mask = ids.to(dev), mask.to(dev)
            kwargs = {self.cache_kw: cache} if cache is not None else {}
            if self.gen_cfg.stop_strings:
                kwargs["tokenizer"] = self.tokenizer
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(seed)
                out = self.model.generate(input_ids=ids, attention_mask=mask,
                                          generation_config=self.gen_cfg, **kwargs)
            if cache is not None:
                extra = cache.get_seq_length() - ids.shape[1]
                if extra > 0:  # drop the generated tokens' KV (crop(-0) would empty it on 4.x)
                    cache.crop(-extra)
                self.cache, self.mask, self.rows = cache, mask.cpu(), list(slots)
                self.cached = {s: list(p) for s, p in zip(slots, prompts)}  # callers may mutate theirs
        replies = []
        for row in out[:, ids.shape[1]:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in self.eos), None)
            if cut is None:  # budget or stop string: drop the padding after a stopped row
                cut = len(row)
                while cut and row[cut - 1] == self.pad_id:
                    cut -= 1
            replies.append(row[:cut])
        return replies


_VLLM_ENGINES: dict[str, Any] = {}


class VLLMBackend:
    """vLLM with prefix caching (the shared conversation prefix of each turn is not recomputed).

    vLLM loads weights from a path, so `model` must be a checkpoint directory or hub id (save
    the policy with `rl.models.save_model` first); an in-memory model is refused rather than
    silently rolled out with stale weights.
    """

    def __init__(self, model, tokenizer, cfg: RolloutConfig, greedy: bool):
        import torch

        try:
            import vllm
        except ImportError as e:
            raise RuntimeError("rollout.backend='vllm' needs vllm (pip install vllm); use backend='hf'") from e
        if not torch.cuda.is_available():
            raise RuntimeError("rollout.backend='vllm' needs a CUDA GPU; use backend='hf' on CPU")
        if not isinstance(model, str):
            raise ValueError("rollout.backend='vllm' takes a checkpoint path as `model` "
                             "(save the policy with rl.models.save_model); got a model object")
        if model not in _VLLM_ENGINES:
            # leave GPU memory for the trainer's own copy of the policy
            _VLLM_ENGINES[model] = vllm.LLM(model=model, enable_prefix_caching=True,
                                            gpu_memory_utilization=0.4)
        self.llm, self.sampling_params_cls = _VLLM_ENGINES[model], vllm.SamplingParams
        self.eos = _eos_ids(None, tokenizer)
        self.params = dict(
            temperature=0.0 if greedy else cfg.temperature, top_p=1.0 if greedy else cfg.top_p,
            top_k=cfg.top_k if cfg.top_k > 0 and not greedy else -1, max_tokens=cfg.max_new_tokens,
            stop=list(cfg.stop_strings) or None, stop_token_ids=self.eos,
        )
        self.calls = 0

    def generate(self, prompts: list[list[int]], slots: list[int], seed: int) -> list[list[int]]:
        self.calls += 1
        # one seed per row: equal prompts (a task's group) must not share a random stream
        params = [self.sampling_params_cls(**self.params, seed=seed + i) for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def make_backend(model, tokenizer, cfg: RolloutConfig, greedy: bool):
    return (VLLMBackend if cfg.backend == "vllm" else HFBackend)(model, tokenizer, cfg, greedy)


# ---------------------------------------------------------------------------------------------
# Env calls with a timeout: a hung env must not hang the rollout.


def call_all_with_timeout(fns: list[Callable[[], Any]], timeout_s: float) -> list[tuple[bool, Any]]:
    """Run the calls concurrently; (True, result) or (False, exception) per call, in order.

    A call still running after `timeout_s` gives (False, TimeoutError); its daemon thread is
    abandoned (Python cannot kill it), so the caller must not use that env again.
    """
    if timeout_s <= 0:
        out = []
        for fn in fns:
            try:
                out.append((True, fn()))
            except Exception as e:  # noqa: BLE001 - any env error fails only its episode
                out.append((False, e))
        return out
    results: list[tuple[bool, Any]] = [(False, None)] * len(fns)

    def run(k: int, fn: Callable[[], Any]) -> None:
        try:
            results[k] = (True, fn())
        except Exception as e:  # noqa: BLE001
            results[k] = (False, e)

    threads = [threading.Thread(target=run, args=(k, fn), daemon=True) for k, fn in enumerate(fns)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    timed_out = TimeoutError(f"env call exceeded step_timeout_s={timeout_s}")
    return [(False, timed_out) if t.is_alive() else results[k] for k, t in enumerate(threads)]


# ---------------------------------------------------------------------------------------------
# The lockstep loop


@dataclass
class _Episode:
    traj_id: int
    task: str
    group_id: int
    system_prompt: str = ""
    observations: list[str] = field(default_factory=list)  # observation shown before each reply
    steps: list[Step] = field(default_factory=list)
    prompt_text: str = ""  # chat-template rendering of the current prompt
    prompt_ids: list[int] = field(default_factory=list)  # its token ids (the rollout prompt)
    info: dict[str, Any] = field(default_factory=dict)  # the env's latest info
    t0: float = 0.0
    gen_tokens: int = 0
    invalid: int = 0  # steps with valid=False (malformed replies included)
    malformed: int = 0  # replies parse_action could not read


def _context(ep: _Episode, history_turns: int) -> tuple[list[str], list[str]]:
    """The (observations, actions) the next reply is generated from: all, or the history window."""
    return windowed_context(ep.observations, [s.action for s in ep.steps], len(ep.steps), history_turns)


def _render(tokenizer, ep: _Episode, history_turns: int = 0) -> str:
    msgs = build_messages(ep.system_prompt, *_context(ep, history_turns))
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def _extend_prompt(tokenizer, ep: _Episode, history_turns: int = 0) -> None:
    """Append the last action and the new observation to the prompt ids, encoding only them."""
    action = ep.steps[-1].action
    text = _render(tokenizer, ep, history_turns)
    head = ep.prompt_text + action
    if text.startswith(head):
        new = [t for t in (action, text[len(head):]) if t]
        for t in new:
            ep.prompt_ids = ep.prompt_ids + tokenizer(t, add_special_tokens=False)["input_ids"]
    else:  # the history window moved on, or a template that re-renders earlier turns: encode afresh
        ep.prompt_ids = encode_conversation(tokenizer, ep.system_prompt, *_context(ep, history_turns), True).input_ids
    ep.prompt_text = text


def _json_scalars(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if isinstance(v, (bool, int, float, str))}


def _state_before(info: dict[str, Any]) -> dict[str, str]:
    """{"state_before": the env's state the action is taken in} when the env reports `info["state"]`
    (in the info of the reset or of the step before): the anchor of GiGPO's step groups."""
    return {"state_before": str(info["state"])} if "state" in info else {}


def _finish(ep: _Episode, failed: str | None = None, truncated: bool = False,
            overflow: bool = False) -> Trajectory:
    return Trajectory(
        traj_id=ep.traj_id, task=ep.task, steps=ep.steps, group_id=ep.group_id,
        outcome=0.0 if failed else float(ep.info.get("score", 0.0)),
        success=False if failed else bool(ep.info.get("won", False)),
        system_prompt=ep.system_prompt, final_observation=ep.observations[-1] if ep.observations else "",
        failed=failed,
        stats={"turns": float(len(ep.steps)), "gen_tokens": float(ep.gen_tokens),
               "invalid_actions": float(ep.invalid), "malformed_replies": float(ep.malformed),
               "wall_time_s": time.monotonic() - ep.t0,
               "truncated": float(truncated), "prompt_overflow": float(overflow),
               "failed": float(failed is not None)},
    )


def run_episodes(backend, tokenizer, env_factory: Callable[[], Any], episodes: list[tuple[int, str, int]],
                 cfg: RolloutConfig, seed: int = 0, progress: bool = False,
                 desc: str = "rollout") -> list[Trajectory]:
    """Roll out `episodes` = [(traj_id, task, group_id)] with `cfg.num_envs` envs in lockstep."""
    from tqdm.auto import tqdm

    queue = deque(episodes)
    n_slots = min(cfg.num_envs, len(episodes))
    envs: list[Any] = [None] * n_slots
    slots: list[_Episode | None] = [None] * n_slots
    done: list[Trajectory] = []
    bar = tqdm(total=len(episodes), desc=desc, disable=not progress, leave=False)

    def finish(slot: int, traj: Trajectory) -> None:
        done.append(traj)
        slots[slot] = None
        bar.update(1)

    def start(slot: int) -> None:
        while queue and slots[slot] is None:
            traj_id, task, group_id = queue.popleft()
            envs[slot] = envs[slot] or env_factory()
            ep = _Episode(traj_id, task, group_id, t0=time.monotonic())
            ep.system_prompt = getattr(envs[slot], "system_prompt", "")
            (ok, res), = call_all_with_timeout([lambda e=envs[slot]: e.reset(task)], cfg.step_timeout_s)
            if not ok:
                envs[slot] = None  # a broken env is replaced, never reused
                finish(slot, _finish(ep, failed=f"reset: {type(res).__name__}: {res}"))
                continue
            ep.observations.append(res[0])
            ep.info = dict(res[1] or {})
            ep.prompt_text = _render(tokenizer, ep)
            ep.prompt_ids = encode_conversation(tokenizer, ep.system_prompt, ep.observations, [],
                                                add_generation_prompt=True).input_ids
            slots[slot] = ep
            if len(ep.prompt_ids) > cfg.max_prompt_tokens:
                finish(slot, _finish(ep, truncated=True, overflow=True))

    for s in range(n_slots):
        start(s)
    turn = 0
    while any(slots):
        active = [s for s in range(n_slots) if slots[s] is not None]
        replies = backend.generate([slots[s].prompt_ids for s in active], active, seed * 1_000_003 + turn)
        turn += 1
        texts, actions = [], []
        for s, ids in zip(active, replies):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            for stop in cfg.stop_strings:
                text = text.split(stop, 1)[0]
            texts.append(text.strip())
            slots[s].gen_tokens += len(ids)
            try:
                actions.append(envs[s].parse_action(texts[-1]))
            except Exception:  # noqa: BLE001 - a parser choking on odd text: the reply is invalid
                actions.append(None)
        to_step = [k for k, a in enumerate(actions) if a is not None]
        results = dict(zip(to_step, call_all_with_timeout(
            [lambda e=envs[active[k]], a=actions[k]: e.step(a) for k in to_step], cfg.step_timeout_s)))
        for k, s in enumerate(active):
            ep = slots[s]
            if actions[k] is None:  # malformed reply: the env is not stepped
                ep.invalid += 1
                ep.malformed += 1
                ep.steps.append(Step(ep.observations[-1], texts[k], valid=False,
                                     info={"parsed": False, **_state_before(ep.info)}))
                obs, is_done = INVALID_REPLY + ep.observations[-1], False
            else:
                ok, res = results[k]
                if not ok:
                    envs[s] = None
                    finish(s, _finish(ep, failed=f"step: {type(res).__name__}: {res}"))
                    start(s)
                    continue
                obs, reward, is_done, info = res
                before = _state_before(ep.info)
                ep.info = dict(info or {})
                ep.invalid += not ep.info.get("valid", True)
                ep.steps.append(Step(ep.observations[-1], texts[k], valid=bool(ep.info.get("valid", True)),
                                     reward=float(reward), info={**_json_scalars(ep.info), **before}))
            ep.observations.append(obs)
            if is_done or len(ep.steps) >= cfg.max_turns:
                finish(s, _finish(ep, truncated=not is_done))
            else:
                _extend_prompt(tokenizer, ep, cfg.history_turns)
                if len(ep.prompt_ids) > cfg.max_prompt_tokens:
                    finish(s, _finish(ep, truncated=True, overflow=True))
            if slots[s] is None:
                start(s)
    bar.close()
    for env in envs:
        if env is not None and hasattr(env, "close"):
            try:
                env.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
    return sorted(done, key=lambda t: t.traj_id)


def collect_rollouts(model, tokenizer, env_factory: Callable[[], Any], tasks: list[str], cfg: RolloutConfig, *,
                     group_size: int = 1, seed: int = 0, greedy: bool = False, accelerator=None,
                     desc: str = "rollout") -> list[Trajectory]:
    """Roll out each task `group_size` times; every process returns the full list by traj_id.

    Trajectories of task i get `group_id=i` and `traj_id = i * group_size + k`. With an
    accelerator of P processes, process p runs episodes p, p+P, ... (strided, so each process
    gets a similar mix of tasks) and the results are gathered on all processes.
    """
    from rl.models import lora_merged

    if group_size < 1:
        raise ValueError(f"group_size={group_size}: must be >= 1")
    episodes = [(i * group_size + k, task, i) for i, task in enumerate(tasks) for k in range(group_size)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if accelerator is not None and not isinstance(model, str):
        model = accelerator.unwrap_model(model)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()  # dropout off: rollouts sample from the policy, not a noisy copy
    merge = cfg.merge_lora and cfg.backend == "hf" and not isinstance(model, str)
    try:
        with lora_merged(model, merge):
            backend = make_backend(model, tokenizer, cfg, greedy)
            mine = run_episodes(backend, tokenizer, env_factory, episodes[rank::world], cfg,
                                seed=seed + 7919 * rank, progress=rank == 0, desc=desc)
    finally:
        if was_training:
            model.train()
    if world == 1:
        return mine
    from accelerate.utils import gather_object

    return sorted(gather_object(mine), key=lambda t: t.traj_id)


def rollout_summary(trajs: list[Trajectory]) -> dict[str, float]:
    """Totals over episodes: the engine's counters (for logs and benchmarks)."""
    keys = ("turns", "gen_tokens", "invalid_actions", "malformed_replies", "truncated", "prompt_overflow",
            "failed")
    out = {k: float(sum(t.stats.get(k, 0.0) for t in trajs)) for k in keys}
    out["episodes"] = float(len(trajs))
    out["success_rate"] = sum(t.success for t in trajs) / max(len(trajs), 1)
    return out
