"""A toy multi-turn task for trainer tests: two turns, reply with one letter, "A" is right.

`warm_start` behaviour-clones the tiny model on uniformly random letters so it starts near
P(A) = 1/4 per turn (a random-init model would almost never emit a letter at all); RL must then
raise P(A). Shared by tests/test_ppo.py and tests/ppo_2proc_script.py.
"""

from __future__ import annotations

import torch

from rl.trajectory import Step, Trajectory, tokenize_trajectory

LETTERS = ("A", "B", "C", "D")
TURNS = 2


class LetterEnv:
    system_prompt = "Reply with one letter."

    def tasks(self, split: str) -> list[str]:
        return [f"{split}-{i}" for i in range(16)]

    def reset(self, task: str):
        self.turn = 0
        self.correct = 0
        return "Pick a letter.", {}

    def parse_action(self, reply: str):
        text = reply.strip()
        return text if text in LETTERS else None

    def step(self, action: str):
        self.turn += 1
        self.correct += action == "A"
        done = self.turn >= TURNS
        info = {"valid": action in LETTERS, "won": done and self.correct == TURNS,
                "score": self.correct / TURNS, "progress": self.correct / TURNS}
        return "Pick a letter.", float(done and self.correct == TURNS), done, info


def step_rewards_correct(trajs) -> list[list[float]]:
    """Dense per-step credit: 1 for each "A" (the toy's ground-truth progress increment)."""
    return [[float(s.action == "A") for s in t.steps] for t in trajs]


def terminal_rewards(trajs) -> list[list[float]]:
    """Sparse credit: the outcome at the last step."""
    return [[0.0] * (t.num_steps - 1) + [float(t.outcome)] if t.steps else [] for t in trajs]


def warm_start(model, tokenizer, steps: int = 60, lr: float = 3e-3, seed: int = 0) -> None:
    """Behaviour cloning on random letters (cross-entropy on action tokens only)."""
    import itertools

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    views = []  # every letter sequence once: tokenizing is the slow part, not the tiny model
    for acts in itertools.product(LETTERS, repeat=TURNS):
        traj = Trajectory(0, "t", [Step("Pick a letter.", a, True) for a in acts], 0.0, False,
                          system_prompt=LetterEnv.system_prompt)
        views.append(tokenize_trajectory(tokenizer, traj))
    all_ids = torch.tensor([v.input_ids for v in views])
    all_mask = torch.tensor([v.action_mask for v in views])
    for _ in range(steps):
        rows = torch.randint(len(views), (16,), generator=g)
        ids, mask = all_ids[rows], all_mask[rows]
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (loss * mask[:, 1:]).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def make_rollout_fn(tokenizer, group_size: int, accelerator=None):
    from rl.rollout import RolloutConfig, collect_rollouts

    cfg = RolloutConfig(max_turns=TURNS, max_new_tokens=3, num_envs=16)

    def rollout_fn(model, tasks, seed):
        return collect_rollouts(model, tokenizer, LetterEnv, tasks, cfg, group_size=group_size, seed=seed,
                                accelerator=accelerator)

    return rollout_fn


def make_eval_fn(tokenizer, n: int = 32, accelerator=None):
    rollout = make_rollout_fn(tokenizer, group_size=1, accelerator=accelerator)

    def eval_fn(model) -> dict[str, float]:
        trajs = rollout(model, [f"test-{i}" for i in range(n)], 12345)
        return {"eval/success_rate": sum(t.success for t in trajs) / n,
                "eval/mean_score": sum(t.outcome for t in trajs) / n}

    return eval_fn
