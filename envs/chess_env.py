"""Chess against Stockfish (LMRL-Gym's "Chess" and "Chess endgames"), through python-chess.

Two modes (`mode` option):

- `game`: a full game. Each task starts from the initial position plus `opening_plies` random
  plies (drawn from the task seed, so tasks differ); the agent plays the side to move, Stockfish
  the other side at `opponent_depth` plies (1 = weak). The outcome is the game result for the
  agent: 1 win, 0.5 draw, 0 loss; a game cut by `max_moves` is adjudicated by the engine (the
  score is the final progress below, like engine tournaments adjudicate).
  Progress: the engine's expected score for the agent's side, E = W + D/2 from Stockfish's
  win-draw-loss model (`chess.engine.Score.wdl(model="sf")`) at `analysis_depth`, read after the
  opponent's reply; 1 / 0.5 / 0 once the game is over. So progress moves in [0, 1], is about 0.5
  at the start (not 0: read `info["progress"]` from `reset` as the baseline), and its final value
  is the outcome.
- `endgame`: a simple won endgame (`endgames`: KQK and/or KRK), the agent has the strong side
  (White, to move) and must checkmate within `max_moves` of its own moves; outcome 1 if it does,
  else 0 (stalemate, a captured piece or running out of moves). Stockfish defends at
  `opponent_depth` (default: `analysis_depth`, its best defence). Positions are placed at random
  by seed, legal, not over, and the engine sees a forced mate in at most `max_mate` moves.
  Progress: reduction of the engine's mate distance m_t (its mate-in-n for the agent after the
  defender's reply): p_t = clip(1 - m_t / m_0, 0, 1), 1 once mated, 0 when no forced mate is seen
  any more. m is Stockfish's mate-in at `analysis_depth`, an upper bound on the true distance (a
  search, not a tablebase), so it can wobble by a move or two.

Actions: one move per turn in UCI (`e2e4`, `e7e8q`) or SAN (`Nf3`, `O-O`, `exd5`); the observation
shows the position as FEN (and as a board, `show_board`), the opponent's last move and, with
`show_legal`, the legal moves. A malformed or illegal move is an invalid step (`valid=False`): the
board is unchanged, the turn still counts towards `max_moves`, and the game goes on (LMRL-Gym
ends the game on an illegal move instead: `illegal_ends_game=True` does that, scoring 0).

Expert: Stockfish at `expert_depth` playing the agent's side against the same opponent (the
opponent is deterministic: Threads=1, hash cleared before every search, random moves drawn from a
per-task seed), so the expert's moves replay exactly in `step`.

Task ids are "<split>-<index>"; positions come from one seeded stream, deduplicated by FEN, so
train/dev/test never share a start position. Endgame task lists need engine searches; they are
cached as JSON under `cache_dir` (default `~/.cache/spa-rl/chess`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from envs.base import SPLITS, EnvError, register

_FORMAT_VERSION = 3  # bump when the cached task layout changes
_PREFIX = re.compile(r"^(action|move)?\s*[:>]\s*", re.IGNORECASE)
_MOVE_NUMBER = re.compile(r"^\d+\.+")  # "12." or "12..." before a move
_UCI = re.compile(r"^[a-h][1-8][a-h][1-8][qrbn]?$")
_SAN = re.compile(r"^(O-O-O|O-O|[KQRBN][a-h]?[1-8]?x?[a-h][1-8]|[a-h](x[a-h])?[1-8](=?[QRBN])?)[+#]?$")
_EDGE = " \t.,;:!?'\"`*()[]"
_ENGINE_PLACES = ("/usr/games/stockfish", "/usr/local/bin/stockfish", "/usr/bin/stockfish",
                  "/opt/homebrew/bin/stockfish")
_ENDGAMES = {"KQK": "Q", "KRK": "R"}


def parse_action(reply: str) -> str | None:
    """Model reply -> move text: the first word of the first non-empty line, minus an 'Action:' /
    '>' prefix, a move number ('12.') and punctuation; UCI is lower-cased, SAN keeps its case
    (Bb4 and b4 are different moves). None when that word is not UCI or SAN shaped."""
    for line in (reply or "").splitlines():
        words = _PREFIX.sub("", line.strip().strip(_EDGE)).split()
        while words and _MOVE_NUMBER.match(words[0]):
            rest = _MOVE_NUMBER.sub("", words[0])
            words = ([rest] if rest else []) + words[1:]
        if not words:
            continue
        move = words[0].strip(_EDGE).replace("0-0-0", "O-O-O").replace("0-0", "O-O")
        if _UCI.match(move.lower()):
            return move.lower()
        return move if _SAN.match(move) else None
    return None


def find_engine(engine_path: str | None = None) -> str:
    """The Stockfish binary: `engine_path`, else $STOCKFISH_PATH, PATH, or a known install place."""
    if engine_path:
        if not (os.path.isfile(engine_path) and os.access(engine_path, os.X_OK)):
            raise EnvError(f"env.options.engine_path={engine_path!r} is not an executable file")
        return engine_path
    for candidate in (os.environ.get("STOCKFISH_PATH"), shutil.which("stockfish"), *_ENGINE_PLACES):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise EnvError("env 'chess' needs the Stockfish engine: apt-get install stockfish (it installs "
                   "/usr/games/stockfish) or set env.options.engine_path")


def _import_chess():
    try:
        import chess  # noqa: PLC0415  (optional: imported only when the env is used)
        import chess.engine  # noqa: PLC0415
    except ImportError as e:
        raise EnvError(f"env 'chess' needs python-chess: pip install chess ({e})")
    return chess


def _pushed(board):
    """Yield once per legal move with that move pushed (popped again after)."""
    for move in list(board.legal_moves):
        board.push(move)
        try:
            yield move
        finally:
            board.pop()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class _Uci:
    """A minimal synchronous UCI client. python-chess's SimpleEngine runs a non-daemon event-loop
    thread, so an env that is never closed would hang the interpreter at exit; here the engine is
    a plain child process that quits on its own when our end of its stdin closes."""

    def __init__(self, path: str):
        try:
            self.proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True, bufsize=1)
            self._send("uci")
            self._read_until("uciok")
            self._send("setoption name Threads value 1")
            self._send("setoption name Hash value 16")
            self._send("isready")
            self._read_until("readyok")
        except (OSError, EOFError) as e:
            raise EnvError(f"env chess: cannot start the engine {path!r}: {e}") from e

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _read_until(self, prefix: str) -> list[str]:
        lines = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise EOFError(f"the engine exited while we waited for {prefix!r}")
            lines.append(line.strip())
            if line.startswith(prefix):
                return lines

    def search(self, chess, board, depth: int) -> dict:
        self._send("ucinewgame")
        self._send("position fen " + board.fen())
        self._send(f"go depth {depth}")
        score, pv = None, []
        for line in self._read_until("bestmove"):
            words = line.split()
            if words[:1] != ["info"] or "score" not in words or "pv" not in words:
                continue
            kind, value = words[words.index("score") + 1: words.index("score") + 3]
            if words[words.index("score") + 3: words.index("score") + 4] in (["lowerbound"], ["upperbound"]):
                continue
            score = chess.engine.Cp(int(value)) if kind == "cp" else chess.engine.Mate(int(value))
            pv = [chess.Move.from_uci(m) for m in words[words.index("pv") + 1:]]
        if score is None or not pv:
            raise EnvError(f"env chess: the engine gave no move for {board.fen()}")
        return {"score": chess.engine.PovScore(score, board.turn), "pv": pv}

    def close(self) -> None:
        try:
            self._send("quit")
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - the engine may already be gone
            self.proc.kill()


@register("chess")
class ChessEnv:
    """Chess or chess endgames against Stockfish (rules in the module docstring).

    Options:
        mode: "game" (a full game from a randomised opening) or "endgame" (mate a lone king).
        endgames: endgame mode: material to draw from, any of "KQK", "KRK" (default ["KQK"]).
        max_mate: endgame mode: keep positions where the engine mates in at most this many moves.
        max_moves: agent turns per episode, invalid ones included (default 60 game, 12 endgame).
        opening_plies: game mode: random plies played before the agent's first move (odd: the
            agent plays Black).
        opponent_depth: search depth of the opponent (default 1 game, `analysis_depth` endgame).
        opponent_random: probability that the opponent plays a uniformly random legal move
            instead (drawn from a per-task seed: episodes stay reproducible).
        analysis_depth: depth of the searches that measure progress (default 8 game, 16 endgame;
            KRK mates need ~22 to be seen).
        expert_depth: depth of the expert's searches (default 12 game, `analysis_depth` endgame).
        move_format: "uci" or "san": how the expert writes moves and the board lists them
            (the agent may answer in either).
        show_board: also draw the board as 8 text rows (uppercase White, rank 8 on top).
        show_legal: list the legal moves in every observation.
        illegal_ends_game: an invalid move ends the game with score 0 (LMRL-Gym's rule).
        num_train_tasks, num_dev_tasks, num_test_tasks: tasks per split.
        seed: fixes every start position and the opponent's random moves.
        engine_path: the Stockfish binary (default: $STOCKFISH_PATH, PATH, /usr/games/stockfish).
        cache_dir: where endgame task lists are cached (default `~/.cache/spa-rl/chess`).
    """

    def __init__(self, mode: str = "game", endgames: list[str] | tuple[str, ...] = ("KQK",),
                 max_mate: int = 10, max_moves: int | None = None, opening_plies: int = 4,
                 opponent_depth: int | None = None, opponent_random: float = 0.0,
                 analysis_depth: int | None = None, expert_depth: int | None = None,
                 move_format: str = "uci", show_board: bool = True, show_legal: bool = False,
                 illegal_ends_game: bool = False, num_train_tasks: int = 100,
                 num_dev_tasks: int = 20, num_test_tasks: int = 50, seed: int = 0,
                 engine_path: str | None = None, cache_dir: str | None = None):
        if mode not in ("game", "endgame"):
            raise EnvError(f"env.mode={mode!r}: choose 'game' or 'endgame'")
        endgames = [endgames] if isinstance(endgames, str) else list(endgames)
        if not endgames or any(e not in _ENDGAMES for e in endgames):
            raise EnvError(f"env.endgames={endgames!r}: choose from {sorted(_ENDGAMES)}")
        if move_format not in ("uci", "san"):
            raise EnvError(f"env.move_format={move_format!r}: choose 'uci' or 'san'")
        if not 0.0 <= opponent_random <= 1.0:
            raise EnvError(f"env.opponent_random={opponent_random!r}: must lie in [0, 1]")
        game = mode == "game"
        analysis_depth = analysis_depth or (8 if game else 16)
        self.mode, self.endgames, self.max_mate = mode, endgames, max_mate
        self.max_moves = (60 if game else 12) if max_moves is None else max_moves
        self.opponent_depth = opponent_depth or (1 if game else analysis_depth)
        self.analysis_depth = analysis_depth
        self.expert_depth = expert_depth or (12 if game else analysis_depth)
        for name, value, low in [("max_mate", max_mate, 1), ("max_moves", self.max_moves, 1),
                                 ("opening_plies", opening_plies, 0),
                                 ("opponent_depth", self.opponent_depth, 1),
                                 ("analysis_depth", analysis_depth, 1), ("expert_depth", self.expert_depth, 1),
                                 ("num_train_tasks", num_train_tasks, 1), ("num_dev_tasks", num_dev_tasks, 0),
                                 ("num_test_tasks", num_test_tasks, 0)]:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise EnvError(f"env.{name}={value!r}: must be an integer >= {low}")
        self.opening_plies, self.opponent_random = opening_plies, opponent_random
        self.move_format, self.show_board, self.show_legal = move_format, show_board, show_legal
        self.illegal_ends_game, self.seed = illegal_ends_game, seed
        self._chess = _import_chess()
        self.engine_path = find_engine(engine_path)
        self._engine = None  # started on first use: constructing an env is cheap
        counts = {"train": num_train_tasks, "dev": num_dev_tasks, "test": num_test_tasks}
        root = Path(cache_dir) if cache_dir else (
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spa-rl" / "chess")
        self._tasks = self._game_tasks(counts) if game else self._endgame_tasks(counts, root)
        goal = ("win the game" if game else
                f"checkmate the lone black king within {self.max_moves} moves")
        self.system_prompt = (
            f"You are playing chess against the Stockfish engine; you play the side to move and must "
            f"{goal}. Each message gives the opponent's last move and the position in FEN"
            + (" and as a board (uppercase = White, lowercase = Black, '.' = empty, rank 8 on top)"
               if show_board else "")
            + (", followed by your legal moves" if show_legal else "")
            + ". Reply with exactly one legal move in UCI (e.g. e2e4, e7e8q) or SAN (e.g. Nf3, O-O) "
            "notation and nothing else.")
        self._state: dict | None = None

    # --- task sets --------------------------------------------------------------------------

    def _split_tasks(self, counts: dict[str, int], records: list[dict]) -> dict[str, dict]:
        out, start = {}, 0
        for split in SPLITS:
            for i in range(counts[split]):
                out[f"{split}-{i:04d}"] = records[start + i]
            start += counts[split]
        return out

    def _game_tasks(self, counts: dict[str, int]) -> dict[str, dict]:
        """Start positions: `opening_plies` random legal plies from the initial position."""
        chess, rng = self._chess, random.Random(f"chess-game/{self.seed}")
        wanted, seen, records = sum(counts.values()), set(), []
        for _ in range(50 * wanted + 100):
            board = chess.Board()
            for _ in range(self.opening_plies):
                board.push(rng.choice(list(board.legal_moves)))
                if board.is_game_over():
                    break
            if not board.is_game_over() and board.fen() not in seen:
                seen.add(board.fen())
                records.append({"fen": board.fen()})
                if len(records) == wanted:
                    return self._split_tasks(counts, records)
        raise EnvError(f"env chess: only {len(records)} distinct openings of {self.opening_plies} plies; "
                       f"{wanted} tasks asked (raise opening_plies)")

    def _endgame_tasks(self, counts: dict[str, int], root: Path) -> dict[str, dict]:
        """Random KQK/KRK placements (White to move, not over) where the engine mates in at most
        `max_mate` moves; cached, since each candidate costs an engine search."""
        chess = self._chess
        key = json.dumps([_FORMAT_VERSION, self.seed, counts, self.endgames, self.max_mate,
                          self.analysis_depth, chess.__version__])
        path = root / f"endgames-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"
        if path.exists():
            return json.loads(path.read_text())
        rng = random.Random(f"chess-endgame/{self.seed}")
        wanted, seen, records = sum(counts.values()), set(), []
        # a mate in n needs about 2n plies of search; the analysis depth caps it
        depth = min(self.analysis_depth, 2 * self.max_mate + 4)
        for _ in range(400 * wanted + 100):
            board = chess.Board(None)
            squares = rng.sample(chess.SQUARES, 3)
            piece = chess.Piece.from_symbol(_ENDGAMES[rng.choice(self.endgames)])
            for square, p in zip(squares, (chess.Piece.from_symbol("K"), piece, chess.Piece.from_symbol("k"))):
                board.set_piece_at(square, p)
            board.turn = chess.WHITE
            if not board.is_valid() or board.is_game_over() or board.fen() in seen:
                continue
            seen.add(board.fen())
            if self.max_mate == 1:  # exact and ~50x cheaper than a search: try every move
                mate = 1 if any(board.is_checkmate() for _ in _pushed(board)) else None
            else:
                mate = self._search(board, depth)["score"].pov(chess.WHITE).mate()
            if mate == 1:
                records.append({"fen": board.fen(), "mate": 1})
            elif mate is not None and 0 < mate <= self.max_mate:
                # m_0 from the same depth as every later m_t, so an optimal first move gives 1/m_0
                deep = self._search(board, self.analysis_depth)["score"].pov(chess.WHITE).mate()
                records.append({"fen": board.fen(), "mate": deep if deep and deep > 0 else mate})
            if len(records) == wanted:
                tasks = self._split_tasks(counts, records)
                root.mkdir(parents=True, exist_ok=True)
                _write_json_atomic(path, tasks)
                return tasks
        raise EnvError(f"env chess: found only {len(records)} endgames {self.endgames} with mate in "
                       f"<= {self.max_mate}; {wanted} asked (raise max_mate)")

    def tasks(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise EnvError(f"split={split!r}: must be one of {list(SPLITS)}")
        return [t for t in self._tasks if t.startswith(split + "-")]

    def _record(self, task: str) -> dict:
        if task not in self._tasks:
            raise EnvError(f"unknown chess task {task!r}; ids are '<split>-<index>', e.g. 'train-0000'")
        return self._tasks[task]

    def start_fen(self, task: str) -> str:
        return self._record(task)["fen"]

    # --- engine -----------------------------------------------------------------------------

    def _search(self, board, depth: int) -> dict:
        """A fresh depth-limited search (hash cleared first: the result depends only on the
        board): {"score": PovScore, "pv": [Move, ...]}."""
        if self._engine is None:
            self._engine = _Uci(self.engine_path)
        return self._engine.search(self._chess, board, depth)

    # --- playing ----------------------------------------------------------------------------

    def _new_state(self, task: str) -> dict:
        board = self._chess.Board(self.start_fen(task))
        return {"task": task, "board": board, "agent": board.turn, "turns": 0, "done": False,
                "won": False, "score": 0.0, "last": None,
                "rng": random.Random(f"chess-opponent/{self.seed}/{task}"),
                "mate0": self._tasks[task].get("mate"), "progress": 0.0}

    def _value(self, st: dict, score) -> float:
        """Progress from an engine score (PovScore) of the position with the agent to move."""
        pov = score.pov(st["agent"])
        if self.mode == "game":
            return float(pov.wdl(model="sf", ply=st["board"].ply()).expectation())
        mate = pov.mate()
        if mate is None or mate <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - mate / st["mate0"]))

    def _finish(self, st: dict) -> None:
        """The game is over on the board: set won / score / progress from its result."""
        outcome = st["board"].outcome()
        st["done"] = True
        if outcome.winner is None:
            st["score"] = 0.5 if self.mode == "game" else 0.0
        else:
            st["won"] = outcome.winner == st["agent"]
            st["score"] = 1.0 if st["won"] else 0.0
        st["progress"] = 1.0 if st["won"] else (st["score"] if self.mode == "game" else 0.0)

    def _opponent_and_progress(self, st: dict) -> None:
        """The opponent replies, then progress is measured by a search with the agent to move
        (the opponent's own search is not reused: Stockfish's mate-in from the defender's side
        differs from the attacker's by a move now and then, which made progress jump)."""
        board = st["board"]
        if st["rng"].random() < self.opponent_random:
            move = st["rng"].choice(list(board.legal_moves))
        else:
            move = self._search(board, self.opponent_depth)["pv"][0]
        st["last"] = (board.san(move), move.uci())
        board.push(move)
        if board.is_game_over():
            self._finish(st)
        else:
            st["progress"] = self._value(st, self._search(board, self.analysis_depth)["score"])

    def _to_move(self, board, action: str):
        text = parse_action(action) or (action or "").strip()
        try:
            return board.parse_uci(text) if _UCI.match(text) else board.parse_san(text)
        except ValueError:  # illegal, ambiguous or malformed (python-chess's errors subclass it)
            return None

    def _play(self, st: dict, action: str) -> tuple[bool, str]:
        """One agent turn on state `st`; returns (valid, message)."""
        board = st["board"]
        st["turns"] += 1
        st["last"] = None  # the opponent's reply of this turn, if any
        move = self._to_move(board, action)
        if move is None:
            if self.illegal_ends_game:
                st["done"], st["score"], st["progress"] = True, 0.0, 0.0
            msg = f"'{action}' is not a legal move here."
        else:
            msg = f"You played {board.san(move)} ({move.uci()})."
            board.push(move)
            if board.is_game_over():
                self._finish(st)
            else:
                self._opponent_and_progress(st)
        if not st["done"] and st["turns"] >= self.max_moves:
            st["done"] = True  # truncated: a game is adjudicated, an endgame is lost
            st["score"] = st["progress"] if self.mode == "game" else 0.0
        return move is not None, msg

    def _observation(self, st: dict, msg: str) -> str:
        board = st["board"]
        lines = [msg] if msg else []
        if st["last"] is not None:
            san, uci = st["last"]
            lines.append(f"Opponent played {uci if self.move_format == 'uci' else san}.")
        if st["done"]:
            lines.append("You won!" if st["won"] else ("Game over." if board.is_game_over() or
                                                       self.illegal_ends_game else "Out of moves."))
        side = "White" if st["agent"] else "Black"
        lines.append(f"You play {side}. Position (FEN): {board.fen()}")
        if self.show_board:
            lines.append(str(board))
        if self.show_legal and not st["done"]:
            moves = [m.uci() if self.move_format == "uci" else board.san(m) for m in board.legal_moves]
            lines.append("Legal moves: " + " ".join(sorted(moves)))
        return "\n".join(lines)

    def _info(self, st: dict, valid: bool) -> dict[str, Any]:
        return {"valid": valid, "won": st["won"], "score": float(st["score"]),
                "progress": float(st["progress"]), "turns": st["turns"], "fen": st["board"].fen()}

    def reset(self, task: str) -> tuple[str, dict[str, Any]]:
        st = self._new_state(task)
        if self.mode == "game":
            st["progress"] = self._value(st, self._search(st["board"], self.analysis_depth)["score"])
        self._state = st
        info = self._info(st, True)
        info["task"] = task
        return self._observation(st, ""), info

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        st = self._state
        if st is None:
            raise EnvError("chess env: call reset(task) before step(action)")
        if st["done"]:
            return "The game is over.", 0.0, True, self._info(st, False)
        valid, msg = self._play(st, action)
        reward = st["score"] if st["done"] else 0.0
        return self._observation(st, msg), float(reward), st["done"], self._info(st, valid)

    def parse_action(self, reply: str) -> str | None:
        return parse_action(reply)

    def expert_actions(self, task: str) -> list[str]:
        """Stockfish at `expert_depth` plays the agent's side against the same (deterministic)
        opponent on a private copy of the game; its moves, in `move_format`."""
        st, actions = self._new_state(task), []
        while not st["done"]:
            move = self._search(st["board"], self.expert_depth)["pv"][0]
            actions.append(move.uci() if self.move_format == "uci" else st["board"].san(move))
            self._play(st, actions[-1])
        return actions

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine = None
