"""Wordle: LMRL-Gym's Wordle (Abdulhai et al. 2023) on a word list shipped in code, pure Python.

The env picks a secret 5-letter word; the agent has `max_guesses` (6) guesses. A reply is the
word itself ("crane"; "guess crane" and LMRL-Gym's spaced letters "c r a n e" are accepted too).
Each legal guess is answered with one letter per position: `g` (right letter, right place),
`y` (in the word elsewhere) or `b` (not in the word, or no more copies of it), with Wordle's rule
for repeated letters (greens first, then yellows while unmatched copies remain):
"crane: bygbb. 5 guesses left."

A guess that is not in `WORDS` (482 common words, all shipped here) is an invalid step: it is
answered "Not in the word list." and costs no guess, but every reply counts towards `max_steps`.
Malformed replies (not five letters) are invalid the same way.

Where this departs from LMRL-Gym: its vocabulary is the official Wordle lists (~2.3k secrets,
~13k allowed guesses) and each step earns -1 until the word is found; here secrets and allowed
guesses are the same 482 words (so no download is needed) and the reward is the delayed outcome.
Train/dev/test secrets are disjoint (one seeded shuffle), while any shipped word may be guessed.

Ground truth for credit: with N_0 = len(WORDS) and N_t the words consistent with all feedback
after step t, `info["progress"]` = log2(N_0 / N_t) / (log2(N_0) + 1) until the word is guessed
and 1 then: the bits learnt, with the winning guess worth one more bit (knowing the word and
typing it are told apart). Greens/5 was the alternative; it can reach 1 without a win (greens at
different positions in different guesses), so the outcome would not be the increments' sum. The
`score` is the progress reached. The expert guesses the word whose feedback splits the remaining
candidates into the smallest largest group (any word may be guessed; ties prefer a candidate,
then list order), and the candidate itself once at most two remain; it wins every shipped word
within 4 guesses (tested over all of them).
"""

from __future__ import annotations

import functools
import re

from envs.base import EnvError, first_command_line, register
from envs.splits import assign_splits, bits_progress, check_split, split_counts

WORDS = tuple("""
about above abuse actor acute admit adopt adult after again agent agree ahead alarm album alert
alike alive allow alone along alter among anger angle angry apart apple apply arena argue arise
array aside asset audio audit avoid award aware badly baker basic basis beach begin being below
bench birth black blade blame blind block blood board boost booth bound brain brand bread break
breed brief bring broad broke brown build built buyer cabin cable candy carry catch cause chain
chair chalk charm chart chase cheap check chest chief child chose civil claim class clean clear
click climb clock close cloud coach coast could count court cover crack craft crash cream crime
cross crowd crown curve cycle daily dance dealt death debut delay depth doing doubt dozen draft
drama drawn dream dress drink drive drove dying eager early earth eight elite empty enemy enjoy
enter entry equal error event every exact exist extra faith false fault fiber field fifth fifty
fight final first fixed flash fleet floor fluid focus force forth forty forum found frame frank
fresh front fruit fully funny giant given glass globe going grace grade grand grant grass great
green gross group grown guard guess guest guide happy heart heavy hence horse hotel house human
ideal image index inner input issue joint judge knife known label large laser later laugh layer
learn lease least leave legal lemon level light limit local logic loose lower lucky lunch magic
major maker march match maybe mayor meant media metal might minor minus mixed model money month
moral motor mount mouse mouth movie music never newly night noise north noted novel nurse occur
ocean offer often order other ought outer owner paint panel paper party peace phase phone photo
piano piece pilot pitch place plain plane plant plate point pound power press price pride prime
print prior prize proof proud prove queen quick quiet quite radio raise range rapid ratio reach
ready refer relax reply right river robot rough round route royal rural scale scene scope score
sense serve seven shall shape share sharp sheet shelf shell shift shirt shock shoot short shown
sight since sixth sixty skill sleep slide small smart smile smoke solid solve sorry sound south
space spare speak speed spend spent split spoke sport staff stage stake stand start state steam
steel stick still stock stone stood store storm story strip stuck study stuff style sugar suite
super sweet table taken taste teach teeth thank theme there thick thing think third those three
threw throw tight tired title today topic total touch tough tower track trade train treat trend
trial tribe trick tried truck truly trust truth twice under union unity until upper upset urban
usage usual valid value video virus visit vital voice waste watch water wheel where which while
white whole whose woman women world worry worse worst worth would wound write wrong wrote yield
young youth
""".split())
_INDEX = {w: i for i, w in enumerate(WORDS)}
_SPACED = re.compile(r"^(?:guess:?\s+)?([a-z](?: [a-z]){4})$")
_PLAIN = re.compile(r"^(?:guess:?\s+)?([a-z]{5})$")


def parse_action(reply: str) -> str | None:
    """The 5-letter word of a reply ('crane', 'guess crane', 'c r a n e'), in or out of the list;
    None when the first line is not one."""
    text = first_command_line(reply) or ""
    m = _PLAIN.match(text) or _SPACED.match(text)
    return m.group(1).replace(" ", "") if m else None


def feedback(guess: str, secret: str) -> str:
    """Wordle's colouring of `guess` against `secret`: 'g' / 'y' / 'b' per letter."""
    out = ["b"] * 5
    unmatched: dict[str, int] = {}
    for i, (g, s) in enumerate(zip(guess, secret)):
        if g == s:
            out[i] = "g"
        else:
            unmatched[s] = unmatched.get(s, 0) + 1
    for i, g in enumerate(guess):
        if out[i] == "b" and unmatched.get(g, 0) > 0:
            out[i] = "y"
            unmatched[g] -= 1
    return "".join(out)


@functools.cache
def _partition(guess: str) -> dict[str, frozenset[int]]:
    """Feedback pattern -> indices of the words that would answer `guess` with it (cached: the
    candidate update is then one set intersection per step)."""
    groups: dict[str, set[int]] = {}
    for i, secret in enumerate(WORDS):
        groups.setdefault(feedback(guess, secret), set()).add(i)
    return {p: frozenset(s) for p, s in groups.items()}


@functools.cache
def _row(guess: str) -> tuple[str, ...]:
    return tuple(feedback(guess, secret) for secret in WORDS)


def _worst_group(guess: str, candidates: frozenset[int]) -> int:
    row, sizes = _row(guess), {}
    for i in candidates:
        sizes[row[i]] = sizes.get(row[i], 0) + 1
    return max(sizes.values())


@functools.cache
def best_guess(candidates: frozenset[int]) -> str:
    """The expert's choice: a candidate when at most two remain, else the minimax word."""
    if len(candidates) <= 2:
        return WORDS[min(candidates)]
    return min(WORDS, key=lambda w: (_worst_group(w, candidates), _INDEX[w] not in candidates, _INDEX[w]))


@register("wordle")
class WordleEnv:
    """Options: `max_guesses` (legal guesses per game, default 6), `max_steps` (replies per game,
    legal or not, default max_guesses + 4), `num_train_tasks`, `num_dev_tasks`, `num_test_tasks`
    (secret words per split, disjoint), `seed`."""

    system_prompt = ("Guess the secret 5-letter word. Reply with one word per turn. Feedback per letter: "
                     "g = right place, y = in the word elsewhere, b = not in the word.")

    def __init__(self, max_guesses: int = 6, max_steps: int | None = None, num_train_tasks: int = 300,
                 num_dev_tasks: int = 50, num_test_tasks: int = 100, seed: int = 0):
        if max_guesses < 1:
            raise EnvError(f"wordle: env.max_guesses={max_guesses}: must be >= 1")
        self.max_guesses = max_guesses
        self.max_steps = max_steps if max_steps is not None else max_guesses + 4
        if self.max_steps < max_guesses:
            raise EnvError(f"wordle: env.max_steps={self.max_steps}: must be >= max_guesses={max_guesses}")
        counts = split_counts("wordle", num_train_tasks, num_dev_tasks, num_test_tasks)
        self._splits = assign_splits("wordle", WORDS, counts, seed)
        self._tasks = {k: v for split in self._splits.values() for k, v in split.items()}
        self._task: str | None = None

    def tasks(self, split: str) -> list[str]:
        return check_split("wordle", self._splits, split)

    def parse_action(self, reply: str) -> str | None:
        return parse_action(reply)

    def _info(self, valid: bool) -> dict:
        progress = bits_progress(len(WORDS), len(self.candidates), self.won)
        return {"valid": valid, "won": self.won, "score": progress, "progress": progress,
                "candidates": len(self.candidates), "guesses": self.guesses}

    def reset(self, task: str) -> tuple[str, dict]:
        if task not in self._tasks:
            raise EnvError(f"wordle has no task {task!r}")
        self._task, self.secret = task, self._tasks[task]
        self.candidates = frozenset(range(len(WORDS)))
        self.won, self.guesses, self.steps = False, 0, 0
        return f"Guess the word. {self.max_guesses} guesses left.", self._info(True)

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self._task is None:
            raise RuntimeError("wordle: call reset(task) before step()")
        self.steps += 1
        word = parse_action(action)
        valid = word in _INDEX
        if word is None:
            obs = "Reply with a 5-letter word."
        elif not valid:
            obs = "Not in the word list."
        else:
            self.guesses += 1
            pattern = feedback(word, self.secret)
            self.candidates = self.candidates & _partition(word)[pattern]
            self.won = word == self.secret
            left = self.max_guesses - self.guesses
            obs = f"{word}: {pattern}. " + ("You won." if self.won else f"{left} guess{'es' if left != 1 else ''} left.")
        done = self.won or self.guesses >= self.max_guesses or self.steps >= self.max_steps
        return obs, 1.0 if self.won else 0.0, done, self._info(valid)

    def expert_actions(self, task: str) -> list[str]:
        secret, candidates, actions = self._tasks[task], frozenset(range(len(WORDS))), []
        while not actions or actions[-1] != secret:
            guess = best_guess(candidates)
            actions.append(guess)
            candidates = candidates & _partition(guess)[feedback(guess, secret)]
        return actions

    def close(self) -> None:
        pass
