"""Expert demonstrations: play an env's oracle actions and record them as trajectories."""

from __future__ import annotations

from rl.trajectory import Step, Trajectory


def expert_trajectories(env, tasks: list[str], start_id: int = 0) -> list[Trajectory]:
    """One trajectory per task from `env.expert_actions(task)`, with the env's real observations.

    Raises ValueError naming the env when it offers no expert, and the task when its expert
    actions do not win (a demonstration that loses would teach the wrong thing).
    """
    if not hasattr(env, "expert_actions"):
        raise ValueError(f"{type(env).__name__} has no expert_actions(); sft needs demonstrations")
    trajs = []
    for i, task in enumerate(tasks):
        obs, info = env.reset(task)
        steps: list[Step] = []
        done = False
        for action in env.expert_actions(task):
            next_obs, reward, done, info = env.step(action)
            steps.append(Step(obs, action, bool(info.get("valid", True)), float(reward),
                              {k: info[k] for k in ("progress",) if k in info}))
            obs = next_obs
            if done:
                break
        if not (done and info.get("won")):
            raise ValueError(f"expert actions of task {task!r} do not win the episode")
        trajs.append(Trajectory(traj_id=start_id + i, task=task, steps=steps,
                                outcome=float(info.get("score", 1.0)), success=True, group_id=i,
                                system_prompt=env.system_prompt, final_observation=obs,
                                stats={"turns": len(steps)}))
    return trajs
