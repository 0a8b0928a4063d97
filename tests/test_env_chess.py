"""Chess env: python-chess rules against the real Stockfish binary (tests needing it skip without)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from envs import EnvError, check_env, make_env

chess = pytest.importorskip("chess")

from envs.chess_env import find_engine, parse_action  # noqa: E402  (needs chess importable)

try:
    ENGINE = find_engine()
except EnvError:
    ENGINE = None


def needs_engine(test):
    """Real-engine tests: marked slow, skipped with the reason when Stockfish is absent."""
    test = pytest.mark.skipif(ENGINE is None, reason="no Stockfish binary (apt-get install stockfish)")(test)
    return pytest.mark.slow(test)

ENDGAME = dict(mode="endgame", max_mate=3, num_train_tasks=6, num_dev_tasks=2, num_test_tasks=4, seed=0)
GAME = dict(mode="game", num_train_tasks=4, num_dev_tasks=2, num_test_tasks=3, seed=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("chess"))


@pytest.fixture(scope="module")
def endgame_env(cache):
    env = make_env("chess", cache_dir=cache, **ENDGAME)
    yield env
    env.close()


@pytest.mark.parametrize("reply, expected", [
    ("e2e4", "e2e4"),
    ("E2E4", "e2e4"),
    ("Action: Nf3", "Nf3"),
    ("> e7e8q", "e7e8q"),
    ("12. Bb4+ because it pins", "Bb4+"),
    ("1...exd5", "exd5"),
    ("0-0-0", "O-O-O"),
    ("`O-O`.", "O-O"),
    ("\n\n  Qxg7#  \nmate", "Qxg7#"),
    ("I think the best move is e4", None),
    ("", None),
    ("   \n\t", None),
    ("Action:", None),
    ("z9z9", None),
])
def test_parse_action(reply, expected):
    assert parse_action(reply) == expected


def test_import_envs_does_not_import_chess():
    code = "import envs, sys; assert 'chess' not in sys.modules, 'chess imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_engine_is_one_clear_line(monkeypatch, tmp_path):
    with pytest.raises(EnvError, match="engine_path=.*not an executable file"):
        make_env("chess", engine_path=str(tmp_path / "nope"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("STOCKFISH_PATH", raising=False)
    monkeypatch.setattr("envs.chess_env._ENGINE_PLACES", ())
    with pytest.raises(EnvError, match="apt-get install stockfish") as err:
        make_env("chess")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("options, match", [
    (dict(mode="blitz"), "env.mode='blitz'"),
    (dict(endgames=["KBNK"]), "env.endgames"),
    (dict(move_format="lan"), "env.move_format"),
    (dict(opponent_random=1.5), "env.opponent_random"),
    (dict(max_moves=0), "env.max_moves=0"),
])
@needs_engine
def test_bad_options_fail_early(options, match):
    with pytest.raises(EnvError, match=match):
        make_env("chess", **options)


@needs_engine
def test_game_tasks_are_distinct_openings_and_seeded():
    env = make_env("chess", **GAME)
    fens = [env.start_fen(t) for s in ("train", "dev", "test") for t in env.tasks(s)]
    assert len(fens) == 9 and len(set(fens)) == 9  # splits share no start position
    board = chess.Board(fens[0])
    assert board.ply() == 4 and board.turn == chess.WHITE and not board.is_game_over()
    again = make_env("chess", **GAME)
    assert [again.start_fen(t) for t in again.tasks("test")] == [env.start_fen(t) for t in env.tasks("test")]
    other = make_env("chess", **{**GAME, "seed": 1})
    assert other.start_fen("train-0000") != env.start_fen("train-0000")
    black = make_env("chess", **{**GAME, "opening_plies": 3})
    obs, _ = black.reset("train-0000")
    assert "You play Black." in obs


@needs_engine
def test_endgame_tasks_are_legal_won_positions(endgame_env):
    fens = [endgame_env.start_fen(t) for s in ("train", "dev", "test") for t in endgame_env.tasks(s)]
    assert len(set(fens)) == 12
    for task in endgame_env.tasks("train"):
        board = chess.Board(endgame_env.start_fen(task))
        assert board.is_valid() and not board.is_game_over() and board.turn == chess.WHITE
        assert sorted(p.symbol() for p in board.piece_map().values()) == ["K", "Q", "k"]
        assert 1 <= endgame_env._tasks[task]["mate"] <= 3


@needs_engine
def test_endgame_expert_mates_and_progress_rises_to_one(endgame_env):
    check_env(endgame_env, max_tasks=6)
    for task in endgame_env.tasks("train"):
        mate0 = endgame_env._tasks[task]["mate"]
        actions = endgame_env.expert_actions(task)
        assert len(actions) <= mate0 + 1  # the expert mates (about) as fast as the engine sees
        _, info = endgame_env.reset(task)
        progress = [info["progress"]]
        for a in actions:
            obs, reward, done, info = endgame_env.step(a)
            progress.append(info["progress"])
        assert done and info["won"] and info["score"] == 1.0 and reward == 1.0
        assert progress[0] == 0.0 and progress[-1] == 1.0
        assert "You won!" in obs


@needs_engine
def test_endgame_mate_in_one_progress_is_one_over_m0(endgame_env):
    """An optimal move from a mate-in-m0 position leaves mate in m0-1: progress 1/m0."""
    task = next(t for t in endgame_env.tasks("train") if endgame_env._tasks[t]["mate"] >= 2)
    m0 = endgame_env._tasks[task]["mate"]
    endgame_env.reset(task)
    _, _, done, info = endgame_env.step(endgame_env.expert_actions(task)[0])
    assert not done and info["progress"] == pytest.approx(1 / m0)


@needs_engine
def test_illegal_and_malformed_moves_are_invalid_steps(endgame_env):
    task = endgame_env.tasks("train")[0]
    obs0, _ = endgame_env.reset(task)
    fen = endgame_env.start_fen(task)
    for bad in ("a1a1", "Nf3", "hello", "e9e4"):
        obs, reward, done, info = endgame_env.step(bad)
        assert not info["valid"] and reward == 0.0 and not done
        assert info["fen"] == fen and "not a legal move" in obs
    assert info["turns"] == 4  # invalid turns count towards max_moves
    # a legal move in SAN is accepted just like UCI
    move = chess.Board(fen).san(next(iter(chess.Board(fen).legal_moves)))
    _, _, _, info = endgame_env.step(move)
    assert info["valid"] and info["fen"] != fen


@needs_engine
def test_max_moves_truncates_and_illegal_can_end_the_game(cache, endgame_env):
    env = make_env("chess", cache_dir=cache, max_moves=3, **ENDGAME)
    env.reset("train-0000")
    results = [env.step("a1a1") for _ in range(3)]
    assert [r[2] for r in results] == [False, False, True]
    assert results[-1][3]["score"] == 0.0 and not results[-1][3]["won"] and "Out of moves." in results[-1][0]
    strict = make_env("chess", cache_dir=cache, illegal_ends_game=True, **ENDGAME)
    strict.reset("train-0000")
    obs, reward, done, info = strict.step("a1a1")
    assert done and info["score"] == 0.0 and not info["valid"]
    assert strict.step("a1a1")[2] is True  # stepping a finished game stays done
    env.close(), strict.close()


@needs_engine
def test_full_game_expert_wins_and_progress_is_engine_expectation():
    env = make_env("chess", **GAME)
    obs, info = env.reset("train-0000")
    assert 0.3 < info["progress"] < 0.7  # this 4-ply opening is roughly balanced
    assert "Position (FEN)" in obs and len(obs.splitlines()) >= 9  # FEN line + 8 board rows
    actions = env.expert_actions("train-0000")
    assert actions == env.expert_actions("train-0000")  # deterministic opponent
    for a in actions:
        obs, reward, done, info = env.step(a)
        assert info["valid"] and 0.0 <= info["progress"] <= 1.0
    assert done and info["won"] and info["score"] == 1.0 == info["progress"]
    env.close()


@needs_engine
def test_random_opponent_is_reproducible_per_task():
    env = make_env("chess", opponent_random=1.0, **GAME)
    runs = []
    for _ in range(2):
        env.reset("train-0000")
        fens = []
        for _ in range(3):  # the agent always plays its first legal move in UCI order
            board = chess.Board(fens[-1] if fens else env.start_fen("train-0000"))
            fens.append(env.step(min(m.uci() for m in board.legal_moves))[3]["fen"])
        runs.append(fens)
    assert runs[0] == runs[1]
    env.close()


@needs_engine
def test_mate_in_one_tasks_are_exact(cache):
    """max_mate=1 picks positions by trying every move (no search): each has a mating move, and the
    expert plays one."""
    env = make_env("chess", cache_dir=cache, **{**ENDGAME, "max_mate": 1, "endgames": ["KQK", "KRK"]})
    pieces = set()
    for task in env.tasks("train") + env.tasks("test"):
        board = chess.Board(env.start_fen(task))
        mates = [m for m in board.legal_moves if _mates(board, m)]
        assert mates and env._tasks[task]["mate"] == 1
        pieces.add("".join(sorted(p.symbol() for p in board.piece_map().values())))
        (move,) = env.expert_actions(task)
        assert chess.Move.from_uci(move) in mates
    assert pieces == {"KQk", "KRk"}
    env.close()


def _mates(board, move) -> bool:
    board.push(move)
    try:
        return board.is_checkmate()
    finally:
        board.pop()
