"""Entry point: run a recipe's stages (sft -> explore -> progress -> rl | dpo -> eval).

    python -m rl.train RECIPE [key.sub=value ...]
    accelerate launch --config_file launch/cpu_2proc.yaml -m rl.train RECIPE [key=value ...]

Every stage writes into `runs/<name>/<stage>/` and reads the previous stage's artifacts from
there, so `stages=[rl,eval]` re-runs just those; `resume=true` skips stages already marked done
and continues an interrupted RL stage from its last checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from rl.config import ConfigError, dump_yaml, load_config, to_dict
from rl.credit import CreditConfig, ProgressConfig
from rl.models import ModelConfig
from rl.rollout import RolloutConfig
from rl.trainers.dpo import DPOStageConfig
from rl.trainers.ppo import PPOConfig
from rl.trainers.sft import SFTConfig

Stage = Literal["sft", "explore", "progress", "rl", "dpo", "eval"]
STAGE_ORDER = ("sft", "explore", "progress", "rl", "dpo", "eval")


@dataclass
class EnvConfig:
    name: str = "keydoor"  # registered env name or "package.module:Class"
    options: dict[str, Any] = field(default_factory=dict)  # constructor options of the env
    train_split: str = "train"  # tasks for sft, explore and rl
    eval_split: str = "test"  # held-out tasks for eval
    dev_split: str = ""  # tasks of the evaluations during RL and of rl.keep_best ("": env.eval_split)
    num_train_tasks: int = 0  # use the first N train tasks (0: all)
    num_demo_tasks: int = 0  # sft clones the expert on the first N of those tasks (0: all of them)


@dataclass
class ExploreConfig:
    rollouts_per_task: int = 4  # K trajectories per task (wins and failures) for the estimator
    temperature: float = 1.0  # sampling temperature while exploring


@dataclass
class EvalConfig:
    num_tasks: int = 0  # evaluate on the first N tasks of env.eval_split (0: all)
    greedy: bool = True  # greedy decoding (else the rollout's sampling settings)
    compare_with_sft: bool = True  # also evaluate the SFT policy and print the comparison


@dataclass
class TrackingConfig:
    backends: list[Literal["wandb", "tensorboard"]] = field(default_factory=list)  # metrics.jsonl always
    project: str = "spa-rl"  # wandb project name


@dataclass
class RunConfig:
    name: str = "quickstart"  # run directory name under output_dir
    output_dir: str = "runs"  # parent of run directories
    seed: int = 0  # fixes task order, sampling and initialisation; added to every stage's own seed
    stages: list[Stage] = field(default_factory=lambda: ["sft", "explore", "progress", "rl", "eval"])
    resume: bool = False  # skip finished stages; continue RL from its last checkpoint
    num_threads: int = 0  # torch CPU threads per process (0: torch's default)
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    credit: CreditConfig = field(default_factory=CreditConfig)
    rl: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        # GiGPO's credit is already an advantage: it must not go through GAE or group normalisation
        if "rl" in self.stages and (self.credit.mode == "gigpo") != (self.rl.algo == "gigpo"):
            raise ValueError(f"credit.mode={self.credit.mode!r} with rl.algo={self.rl.algo!r}: "
                             "credit.mode=gigpo and rl.algo=gigpo go together")
        # every advantage estimator sums the step rewards to go (GAE, turn-level GRPO) or over the
        # episode (GRPO, RLOO): fed mc's returns G_t it would sum returns, weighting each step by the
        # number of steps after it
        if "rl" in self.stages and self.credit.mode == "mc":
            raise ValueError("credit.mode='mc' gives returns G_t, and rl sums step rewards to go itself, so G_t "
                             "would be summed twice: for Monte-Carlo returns use credit.mode=terminal with "
                             "rl.gamma=<discount> (every estimator then computes G_t = gamma^(T-t) R)")
        if "rl" in self.stages and self.rl.keep_best and (not self.env.dev_split or self.env.dev_split == self.env.eval_split):
            raise ValueError("rl.keep_best=true selects a checkpoint on env.dev_split: set it to a split other than "
                             f"env.eval_split={self.env.eval_split!r} (selecting on the held-out split would leak)")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class Context:
    cfg: RunConfig
    run_dir: Path
    accelerator: Any
    tracker: Any  # rl.tracking.Tracker or None
    env_factory: Callable[[], Any]
    tasks: dict[str, list[str]] = field(default_factory=dict)

    def log(self, metrics: dict[str, float], stage: str, step: int) -> None:
        if self.tracker is not None:
            self.tracker.log(metrics, stage=stage, step=step)


def build_context(cfg: RunConfig, with_trackers: bool = True) -> Context:
    """Check everything cheap that can be wrong (env options, data dirs, model path) and set up
    the accelerator, so bad input fails before any work starts."""
    from accelerate import Accelerator

    from envs import EnvError, make_env
    from rl.models import BUILTIN_MODELS, resolve_model_dir

    env = make_env(cfg.env.name, **cfg.env.options)  # raises EnvError naming what is missing
    if "sft" in cfg.stages and not callable(getattr(env, "expert_actions", None)):
        raise EnvError(f"env {cfg.env.name!r} has no expert_actions(task), which the sft stage clones; "
                       "remove sft from stages")
    tasks = {}
    for split in (cfg.env.train_split, cfg.env.eval_split, cfg.env.dev_split):
        if split:
            tasks[split] = env.tasks(split)
    if cfg.env.num_train_tasks:
        tasks[cfg.env.train_split] = tasks[cfg.env.train_split][: cfg.env.num_train_tasks]
    if cfg.eval.num_tasks:
        tasks[cfg.env.eval_split] = tasks[cfg.env.eval_split][: cfg.eval.num_tasks]
    if cfg.model.name not in BUILTIN_MODELS or cfg.model.path:
        resolve_model_dir(cfg.model.path or cfg.model.name)
    first = [env]  # hand the already-built env to the first caller: building some envs is slow

    def env_factory():
        return first.pop() if first else make_env(cfg.env.name, **cfg.env.options)

    backends = list(cfg.tracking.backends) if with_trackers else []
    import torch

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # without cpu=True, torchrun-launched CPU processes each believe they are alone (accelerate 1.x)
    accelerator = Accelerator(log_with=backends or None, project_dir=str(cfg.run_dir),
                              cpu=not torch.cuda.is_available())
    tracker = None
    if with_trackers:
        from rl.tracking import Tracker

        tracker = Tracker(cfg.run_dir, accelerator, backends=backends, project=cfg.tracking.project,
                          run_name=cfg.name, config=to_dict(cfg))
    return Context(cfg, cfg.run_dir, accelerator, tracker, env_factory, tasks)


def evaluation_tasks(cfg: RunConfig, ctx: Context) -> list[str]:
    return ctx.tasks[cfg.env.eval_split]


def _read_timing(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_timing(path: Path, timing: dict) -> None:
    timing = {s: timing[s] for s in STAGE_ORDER if s in timing}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(timing, indent=2) + "\n")
    tmp.replace(path)


def write_stage_time(run_dir: Path, stage: str, wall_s: float, earlier_attempts_s: Sequence[float] = ()) -> Path:
    """Record a finished stage in run_dir/timing.json, {stage: {"wall_s", "finished_utc"}}, merged
    across invocations (temp file + rename, as provenance.json): a stage run again replaces its
    entry, a stage skipped on resume keeps it. `earlier_attempts_s` are the seconds of attempts that
    were interrupted before this one finished the stage (StageClock): they are added to wall_s, so
    wall_s is what the stage cost, redone work included, and "attempts_s" lists each attempt."""
    path = Path(run_dir) / "timing.json"
    timing = _read_timing(path)
    attempts = [round(float(a), 1) for a in earlier_attempts_s] + [round(wall_s, 1)]
    entry = {"wall_s": round(sum(attempts), 1), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if len(attempts) > 1:
        entry["attempts_s"] = attempts
    timing[stage] = entry
    _write_timing(path, timing)
    return path


class StageClock:
    """Times one attempt at a stage so that a kill loses none of it: while the stage runs, its
    timing.json entry holds {"running_s": seconds so far, refreshed every `beat_s`, "attempts_s":
    earlier interrupted attempts}. The next attempt (resume=true, or the stage simply run again)
    finds that entry unfinished and carries its seconds forward; `finish` writes the finished entry
    with every attempt counted. A finished entry starts a new count. Resolution: `beat_s`."""

    def __init__(self, run_dir: Path, stage: str, beat_s: float = 30.0):
        import threading

        self.path, self.stage, self.beat_s = Path(run_dir) / "timing.json", stage, beat_s
        prev = _read_timing(self.path).get(stage, {})
        self.earlier: list[float] = (list(prev.get("attempts_s", [])) + [float(prev["running_s"])]
                                     if "running_s" in prev else [])
        self.start = time.time()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"stage-clock-{stage}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            timing = _read_timing(self.path)
            timing[self.stage] = {"running_s": round(time.time() - self.start, 1), "attempts_s": self.earlier}
            _write_timing(self.path, timing)

    def _run(self) -> None:
        while not self._stop.wait(self.beat_s):
            self._beat()

    def _stop_beating(self) -> None:
        with self._lock:  # a beat in progress completes first, none starts after
            self._stop.set()
        self._thread.join()

    def finish(self) -> Path:
        self._stop_beating()
        return write_stage_time(self.path.parent, self.stage, time.time() - self.start, self.earlier)

    def abandon(self) -> None:
        """The attempt failed: leave its seconds as an unfinished entry for the next attempt."""
        self._beat()
        self._stop_beating()


def run(cfg: RunConfig) -> dict[str, float]:
    """Run the selected stages in pipeline order; returns the final eval metrics (if any)."""
    from rl import stages as stage_fns

    ctx = build_context(cfg)
    if ctx.accelerator.is_main_process:
        from rl.provenance import write_provenance

        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        (ctx.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        write_provenance(ctx.run_dir, ctx.accelerator, [s for s in STAGE_ORDER if s in cfg.stages])
    ctx.accelerator.wait_for_everyone()
    results: dict[str, float] = {}
    try:
        for stage in [s for s in STAGE_ORDER if s in cfg.stages]:
            done_marker = ctx.run_dir / stage / "DONE"
            if cfg.resume and done_marker.exists():
                ctx.accelerator.print(f"[{stage}] already done, skipped (resume=true)")
                continue
            ctx.accelerator.print(f"[{stage}] starting")
            clock = StageClock(ctx.run_dir, stage) if ctx.accelerator.is_main_process else None
            try:
                out = getattr(stage_fns, f"run_{stage}")(ctx)
            except BaseException:
                if clock is not None:
                    clock.abandon()
                raise
            if isinstance(out, dict):
                results.update(out)
            ctx.accelerator.wait_for_everyone()
            if clock is not None:
                done_marker.parent.mkdir(parents=True, exist_ok=True)
                done_marker.write_text("done\n")
                clock.finish()
        if ctx.accelerator.is_main_process:
            from rl.report import write_report

            write_report(ctx.run_dir)
        ctx.accelerator.wait_for_everyone()
    finally:
        if ctx.tracker is not None:
            ctx.tracker.close()
        leave_process_group()
    return results


def leave_process_group() -> None:
    """Tear the torch.distributed group down before the interpreter exits: a rank that exits
    while its peer's gloo threads still hold their connection can abort the peer with SIGABRT
    ("terminate called without an active exception"), turning a finished run into a failed one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from envs import EnvError

    try:
        cfg = load_config(RunConfig, argv[0], argv[1:])
        run(cfg)
    except (ConfigError, EnvError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
