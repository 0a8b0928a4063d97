"""Twenty Questions: LMRL-Gym's guessing game (Abdulhai et al. 2023) with a deterministic answerer.

The env thinks of an object; the agent asks yes/no questions and wins by asking "is it a
<object>?" about the right one within `max_questions` turns (20). Every reply counts as a turn.

Where this departs from LMRL-Gym: there the answerer is a language model (Flan-T5 fine-tuned on
GPT-3.5's answers) that takes any free-form question about 158 objects and can answer noisily.
Here the answerer looks the answer up in a hand-written attribute table of the objects in
`OBJECTS`, so questions come from a fixed grammar: one of `QUESTIONS` ("is it an animal?",
"can it fly?", ...) or a guess "is it a <object>?" ("a", "an" or nothing before the name).
Anything else is an invalid step (answered "I cannot answer that."), the turn still counts.
Answers are always right and every object has a distinct row, so the game is solvable by
asking alone.

A task is one secret object; train/dev/test secrets are disjoint (one seeded shuffle), but every
object stays a possible answer for the agent in every split.

Ground truth for credit: with N_0 = len(OBJECTS) and N_t the objects consistent with every
answer after step t, `info["progress"]` = log2(N_0 / N_t) / (log2(N_0) + 1) before the game is
won and 1 once it is: the bits learnt so far, with the final right guess worth one more bit
(without it, knowing the object and naming it would be worth the same). A wrong guess removes
that object; a repeated question adds nothing. The `score` is the progress reached, so the
outcome is the sum of the per-step increments. The expert asks the question that splits the
remaining candidates most evenly (ties: table order) and guesses once one candidate is left.
"""

from __future__ import annotations

import re

from envs.base import EnvError, first_command_line, register
from envs.splits import assign_splits, bits_progress, check_split, split_counts

QUESTIONS = {  # attribute -> its question (replies are matched lower-cased, end punctuation dropped)
    "alive": "is it alive?", "animal": "is it an animal?", "mammal": "is it a mammal?",
    "bird": "is it a bird?", "insect": "is it an insect?", "plant": "is it a plant?",
    "food": "can you eat it?", "fruit": "is it a fruit?", "vegetable": "is it a vegetable?",
    "sweet": "is it sweet?", "tool": "is it a tool?", "vehicle": "is it a vehicle?",
    "furniture": "is it furniture?", "instrument": "is it a musical instrument?",
    "clothing": "is it clothing?", "electric": "does it use electricity?", "screen": "does it have a screen?",
    "metal": "is it made of metal?", "wood": "is it made of wood?", "big": "is it bigger than a person?",
    "small": "does it fit in your hand?", "kitchen": "is it found in a kitchen?",
    "outdoors": "is it found outdoors?", "water": "does it live in water?", "pet": "is it a pet?",
    "fly": "can it fly?", "legs4": "does it have four legs?", "wheels": "does it have wheels?",
    "red": "is it red?", "yellow": "is it yellow?", "green": "is it green?", "brown": "is it brown?",
    "grey": "is it grey?", "round": "is it round?",
    "sharp": "is it sharp?", "soft": "is it soft?",
}
_KINDS = {  # a kind's attributes, shared by every object of that kind
    "mammal": "alive animal mammal", "bird": "alive animal bird fly outdoors", "fish": "alive animal water",
    "insect": "alive animal insect small outdoors", "reptile": "alive animal outdoors",
    "plant": "alive plant outdoors", "fruit": "food fruit kitchen", "vegetable": "food vegetable kitchen",
    "food": "food kitchen", "kitchen": "kitchen", "tool": "tool", "vehicle": "vehicle metal outdoors",
    "furniture": "furniture", "electronic": "electric", "instrument": "instrument", "clothing": "clothing soft",
    "thing": "",
}
# object: kind, then its own attributes; "-x" removes an attribute the kind gave
_TABLE = """
dog: mammal pet legs4
cat: mammal pet legs4 small
horse: mammal big legs4 outdoors brown
cow: mammal big legs4 outdoors
elephant: mammal big legs4 outdoors grey
mouse: mammal small legs4 grey
rabbit: mammal pet legs4 outdoors soft
lion: mammal legs4 outdoors yellow
bear: mammal big legs4 outdoors soft brown
whale: mammal big water
monkey: mammal outdoors brown
bat: mammal fly outdoors small
pig: mammal legs4 outdoors food
sheep: mammal legs4 outdoors soft
giraffe: mammal big legs4 outdoors yellow
eagle: bird big
parrot: bird pet green
penguin: bird -fly water
chicken: bird -fly food
owl: bird small
duck: bird water yellow
shark: fish big sharp grey
goldfish: fish pet small
salmon: fish food
bee: insect fly yellow
ant: insect
butterfly: insect fly
snake: reptile
frog: reptile water green small
turtle: reptile water pet green
tree: plant big wood green
rose: plant red
cactus: plant green sharp
sunflower: plant yellow
apple: fruit red round sweet small
banana: fruit yellow sweet
orange: fruit round sweet small
strawberry: fruit red sweet small
watermelon: fruit round sweet green
lemon: fruit yellow round small
grape: fruit green round sweet small
carrot: vegetable small
potato: vegetable small round brown
tomato: vegetable red round small
broccoli: vegetable green
corn: vegetable yellow
bread: food soft
cheese: food yellow
egg: food small round
cake: food sweet soft round
chocolate: food sweet small brown
pizza: food round
knife: kitchen tool metal sharp small
fork: kitchen metal sharp small
spoon: kitchen metal small
plate: kitchen round
cup: kitchen small
refrigerator: kitchen electric big metal
toaster: kitchen electric metal
hammer: tool metal small
saw: tool metal sharp
shovel: tool metal outdoors
ladder: tool big metal
scissors: tool metal sharp small
car: vehicle wheels electric
bicycle: vehicle wheels
bus: vehicle wheels big electric yellow
train: vehicle wheels big electric
airplane: vehicle big fly electric
boat: vehicle big water -metal wood
helicopter: vehicle big fly
chair: furniture legs4 wood
bed: furniture big wood soft
sofa: furniture soft
lamp: furniture electric
television: electronic screen
computer: electronic screen metal
phone: electronic screen small
radio: electronic metal
guitar: instrument wood
piano: instrument wood big
drum: instrument round
trumpet: instrument metal yellow
shirt: clothing
shoe: clothing -soft small
hat: clothing round
sock: clothing small
ball: thing round small outdoors
book: thing small
pencil: thing wood small sharp
key: thing metal small
coin: thing metal small round
umbrella: thing outdoors
candle: thing small yellow
kite: thing fly outdoors
rock: thing outdoors small round grey
"""


def _parse_table() -> dict[str, frozenset[str]]:
    objects = {}
    for line in _TABLE.strip().splitlines():
        name, _, rest = line.partition(":")
        kind, *own = rest.split()
        attrs = set(_KINDS[kind].split())
        for a in own:
            attrs.discard(a[1:]) if a.startswith("-") else attrs.add(a)
        assert attrs <= set(QUESTIONS), f"{name}: unknown attributes {attrs - set(QUESTIONS)}"
        objects[name] = frozenset(attrs)
    return objects


OBJECTS = _parse_table()
_BY_QUESTION = {q.rstrip("?"): a for a, q in QUESTIONS.items()}
_GUESS_RE = re.compile(r"^is it (?:an? )?(.+)$")


def parse_action(reply: str) -> str | None:
    """A question of the grammar or a guess, as its canonical text; None otherwise."""
    text = first_command_line(reply) or ""
    if text in _BY_QUESTION:
        return QUESTIONS[_BY_QUESTION[text]]
    m = _GUESS_RE.match(text)
    if m and m.group(1) in OBJECTS:
        return f"is it {_article(m.group(1))}?"
    return None


def _article(name: str) -> str:
    if name in ("scissors",):  # plural: no article
        return name
    return ("an " if name[0] in "aeiou" else "a ") + name


def best_question(candidates: list[str]) -> str | None:
    """The attribute that splits `candidates` most evenly (None if none splits them)."""
    best, best_gap = None, len(candidates)
    for attr in QUESTIONS:
        yes = sum(attr in OBJECTS[c] for c in candidates)
        gap = abs(2 * yes - len(candidates))
        if 0 < yes < len(candidates) and gap < best_gap:
            best, best_gap = attr, gap
    return best


@register("twenty_questions")
class TwentyQuestionsEnv:
    """Options: `max_questions` (turns per game, default 20, every reply counts),
    `list_in_prompt` (default true: the system prompt lists the questions and the objects; a tiny
    model learns them from demos instead and is spared ~1,500 prompt tokens), `num_train_tasks`,
    `num_dev_tasks`, `num_test_tasks` (secret objects per split, disjoint), `seed`."""

    def __init__(self, max_questions: int = 20, list_in_prompt: bool = True, num_train_tasks: int = 60,
                 num_dev_tasks: int = 10, num_test_tasks: int = 26, seed: int = 0):
        if max_questions < 1:
            raise EnvError(f"twenty_questions: env.max_questions={max_questions}: must be >= 1")
        self.max_questions = max_questions
        counts = split_counts("twenty_questions", num_train_tasks, num_dev_tasks, num_test_tasks)
        self._splits = assign_splits("twenty_questions", sorted(OBJECTS), counts, seed)
        self._tasks = {k: v for split in self._splits.values() for k, v in split.items()}
        self.system_prompt = ("Guess the object I am thinking of. Ask one yes/no question per turn; "
                              "win by asking 'is it a <object>?' about the right one.")
        if list_in_prompt:
            self.system_prompt += (" Questions: " + " ".join(QUESTIONS.values()) +
                                   " Objects: " + ", ".join(OBJECTS) + ".")
        self._task: str | None = None

    def tasks(self, split: str) -> list[str]:
        return check_split("twenty_questions", self._splits, split)

    def parse_action(self, reply: str) -> str | None:
        return parse_action(reply)

    def _info(self, valid: bool) -> dict:
        progress = bits_progress(len(OBJECTS), len(self.candidates), self.won)
        return {"valid": valid, "won": self.won, "score": progress, "progress": progress,
                "candidates": len(self.candidates)}

    def reset(self, task: str) -> tuple[str, dict]:
        if task not in self._tasks:
            raise EnvError(f"twenty_questions has no task {task!r}")
        self._task, self.secret = task, self._tasks[task]
        self.candidates = list(OBJECTS)
        self.won, self.turns = False, 0
        return f"I am thinking of an object. You have {self.max_questions} questions.", self._info(True)

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self._task is None:
            raise RuntimeError("twenty_questions: call reset(task) before step()")
        self.turns += 1
        question = parse_action(action)
        valid = question is not None
        if not valid:
            answer = "I cannot answer that."
        elif question.rstrip("?") in _BY_QUESTION:
            attr = _BY_QUESTION[question.rstrip("?")]
            yes = attr in OBJECTS[self.secret]
            self.candidates = [c for c in self.candidates if (attr in OBJECTS[c]) == yes]
            answer = "Yes." if yes else "No."
        else:
            guess = _GUESS_RE.match(question.rstrip("?")).group(1)
            self.won = guess == self.secret
            self.candidates = [c for c in self.candidates if c != guess] if not self.won else [guess]
            answer = f"Yes! It is {question[6:-1]}. You won." if self.won else "No."
        done = self.won or self.turns >= self.max_questions
        return answer, 1.0 if self.won else 0.0, done, self._info(valid)

    def expert_actions(self, task: str) -> list[str]:
        secret, candidates, actions = self._tasks[task], list(OBJECTS), []
        while len(candidates) > 1:
            attr = best_question(candidates)
            if attr is None:  # cannot happen while every object has its own row (tested)
                break
            actions.append(QUESTIONS[attr])
            candidates = [c for c in candidates if (attr in OBJECTS[c]) == (attr in OBJECTS[secret])]
        return actions + [f"is it {_article(secret)}?"]

    def close(self) -> None:
        pass
