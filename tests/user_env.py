"""A user's own env, as a user would write it: a plain class with tasks/reset/step/expert_actions,
no system_prompt, no parse_action, registered nowhere (recipes name it `tests.user_env:EchoEnv`)."""

WORDS = ("north", "south", "east", "west")


class EchoEnv:
    """Each task is two words; the agent must say the word shown, twice in a row."""

    def __init__(self, num_train: int = 12):
        pairs = [f"{a}-{b}" for a in WORDS for b in WORDS]
        self.splits = {"train": pairs[:num_train], "test": pairs[num_train:], "dev": pairs[num_train:][:1]}
        self.todo: list[str] = []

    def tasks(self, split):
        return list(self.splits[split])

    def reset(self, task):
        self.todo = task.split("-")
        return f"Say {self.todo[0]}.", {}

    def step(self, action):
        if action != self.todo[0]:
            return f"Wrong. Say {self.todo[0]}.", 0.0, False, {"valid": False, "won": False, "score": 0.0}
        self.todo.pop(0)
        if not self.todo:
            return "Done.", 1.0, True, {"valid": True, "won": True, "score": 1.0}
        return f"Say {self.todo[0]}.", 0.0, False, {"valid": True, "won": False, "score": 0.5}

    def expert_actions(self, task):
        return task.split("-")


class EnvWithoutStep:
    def tasks(self, split):
        return ["t"]

    def reset(self, task):
        return "Hello.", {}


class EnvWithoutExpert(EchoEnv):
    expert_actions = None  # as an env that offers no demonstrations
