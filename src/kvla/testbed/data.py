"""Scripted-expert demonstrations on the MetaWorld tasks, stored as HDF5 in the robomimic/LIBERO layout.

Layout: file attrs ``env_name``, ``image_size``, ``tasks``, ``kvla_version`` (and how it was
collected); group ``data`` (attr ``total``: frames) holding ``demo_{i}`` groups with attrs
``num_samples``, ``task``, ``instruction``, ``seed``, ``success`` and datasets ``actions``
float32 [T,4], ``obs/agentview_rgb`` uint8 [T,S,S,3] (corner2), with ``--wrist`` also
``obs/eye_in_hand_rgb`` uint8 [T,S,S,3] (the gripper camera), ``obs/proprio`` float32 [T,4],
``obs/state`` float32 [T,39], ``dones`` uint8 [T], ``rewards`` float32 [T]. ``actions[t]`` is
the expert's action at the state shown in frame t; ``rewards[t]`` is 1 where that action
reached success; ``dones`` marks the last step.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from kvla.testbed.sim import ALL_TASKS, CAMERA, TASKS, WRIST_CAMERA, SimEnv, ensure_rendering, expert_action, parse_tasks

ENV_NAME = "metaworld-v3"
SETTLE_STEPS = 10  # steps recorded after the first success, to show a settled end
# robomimic/LIBERO observation keys of the cameras kvla records
CAMERA_KEYS = {CAMERA: "agentview_rgb", WRIST_CAMERA: "eye_in_hand_rgb"}


@dataclass
class Demo:
    task: str
    instruction: str
    seed: int
    images: np.ndarray  # uint8 [T,C,S,S,3], cameras in the file's `cameras` order
    proprio: np.ndarray  # float32 [T,4]
    actions: np.ndarray  # float32 [T,4]


@dataclass
class DemoInfo:
    name: str  # the group under data/
    task: str
    instruction: str
    seed: int
    length: int


def run_expert_episode(task: str, seed: int, image_size: int, max_steps: int,
                       cameras: tuple[str, ...] = (CAMERA,)) -> dict[str, Any]:
    """One expert episode; the recording (frames up to SETTLE_STEPS after success) only if it succeeds."""
    images, proprio, states, actions, rewards = [], [], [], [], []
    first_success = None
    with SimEnv(task, seed, image_size, max_steps=max_steps + SETTLE_STEPS, cameras=cameras) as env:
        obs = env.reset()
        for step in range(max_steps + SETTLE_STEPS):
            action = expert_action(task, obs["state"])
            images.append(obs["images"])
            proprio.append(obs["proprio"])
            states.append(obs["state"])
            actions.append(action)
            obs, success, _ = env.step(action)
            rewards.append(float(success))
            if success and first_success is None:
                first_success = step
            if first_success is None and step + 1 >= max_steps:
                break
            if first_success is not None and step >= first_success + SETTLE_STEPS:
                break
    result: dict[str, Any] = {"task": task, "seed": seed, "success": first_success is not None, "cameras": cameras}
    if result["success"]:
        dones = np.zeros(len(actions), np.uint8)
        dones[-1] = 1
        result |= {"images": np.stack(images), "proprio": np.stack(proprio), "states": np.stack(states),
                   "actions": np.stack(actions), "rewards": np.array(rewards, np.float32), "dones": dones}
    return result


def _run_job(job: tuple) -> dict[str, Any]:
    return run_expert_episode(*job)


def _write_episode(f, key: str, ep: dict[str, Any]) -> None:
    demo = f.create_group(key)
    size = ep["images"].shape[2]
    demo.attrs.update(num_samples=len(ep["actions"]), task=ep["task"], instruction=ALL_TASKS[ep["task"]],
                      seed=ep["seed"], success=True)
    demo.create_dataset("actions", data=ep["actions"])
    for camera_index, camera in enumerate(ep["cameras"]):
        demo.create_dataset(f"obs/{CAMERA_KEYS[camera]}", data=ep["images"][:, camera_index],
                            chunks=(1, size, size, 3), compression="gzip")
    demo.create_dataset("obs/proprio", data=ep["proprio"])
    demo.create_dataset("obs/state", data=ep["states"])
    demo.create_dataset("dones", data=ep["dones"])
    demo.create_dataset("rewards", data=ep["rewards"])


def collect(out_path: str | Path, tasks: list[str] | None = None, episodes_per_task: int = 40, seed_start: int = 0,
            image_size: int = 128, max_steps: int = 200, workers: int = 2, progress: bool = True,
            max_attempts: int | None = None, cameras: tuple[str, ...] = (CAMERA,)) -> dict[str, dict[str, float]]:
    """Record ``episodes_per_task`` successful expert episodes per task into an HDF5 file.

    Seeds are tried in order from ``seed_start`` and an episode is kept only if the expert
    succeeds within ``max_steps``, so the file holds the first successful seeds of each task
    whatever ``workers`` is. At most ``max_attempts`` seeds per task (default 2N + 10).
    Returns per task: attempts, successes, mean episode length.
    """
    import h5py

    from kvla import __version__

    tasks = list(TASKS) if tasks is None else list(tasks)
    for task in tasks:
        if task not in ALL_TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(ALL_TASKS)}")
    unknown_cameras = [c for c in cameras if c not in CAMERA_KEYS]
    if unknown_cameras or not cameras or len(set(cameras)) != len(cameras):
        raise ValueError(f"cameras must be distinct names among {', '.join(CAMERA_KEYS)}; got {', '.join(cameras) or 'none'}")
    max_attempts = 2 * episodes_per_task + 10 if max_attempts is None else max_attempts
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")  # renamed when complete
    attempts = {task: 0 for task in tasks}
    kept: dict[str, list[int]] = {task: [] for task in tasks}
    lengths: dict[str, list[int]] = {task: [] for task in tasks}

    ensure_rendering()  # once, here: the workers inherit the GL backend choice
    # Spawned workers make their own envs; mujoco's GL state must not be forked.
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    bar = tqdm(total=len(tasks) * min(episodes_per_task, max_attempts), unit="ep", disable=not progress)
    try:
        with h5py.File(partial, "w") as f:
            while True:
                # Each round tries just enough further seeds to fill each task's shortfall.
                jobs = []
                for task in tasks:
                    wanted = min(episodes_per_task - len(kept[task]), max_attempts - attempts[task])
                    jobs += [(task, seed_start + attempts[task] + i, image_size, max_steps, tuple(cameras))
                             for i in range(wanted)]
                    attempts[task] += wanted
                if not jobs:
                    break
                bar.total = max(bar.total, bar.n + len(jobs))  # grows when seeds fail
                results = pool.imap_unordered(_run_job, jobs) if pool else map(_run_job, jobs)
                for ep in results:
                    bar.update()
                    if ep["success"]:
                        _write_episode(f, f"pending/{ep['task']}/{ep['seed']}", ep)
                        kept[ep["task"]].append(ep["seed"])
                        lengths[ep["task"]].append(len(ep["actions"]))
            # Demos in task order, then seed order.
            total = 0
            data = f.create_group("data")
            for task in tasks:
                for seed in sorted(kept[task]):
                    key = f"data/demo_{len(data)}"
                    f.move(f"pending/{task}/{seed}", key)
                    total += int(f[key].attrs["num_samples"])
            if "pending" in f:
                del f["pending"]
            data.attrs["total"] = total
            f.attrs.update(env_name=ENV_NAME, image_size=image_size, tasks=tasks, kvla_version=__version__,
                           cameras=list(cameras),
                           instructions=json.dumps({t: ALL_TASKS[t] for t in tasks}), seed_start=seed_start,
                           max_steps=max_steps, settle_steps=SETTLE_STEPS, attempts=json.dumps(attempts))
        os.replace(partial, out_path)
    finally:
        bar.close()
        if pool:
            pool.terminate()
    return {task: {"attempts": attempts[task], "successes": len(kept[task]),
                   "mean_length": float(np.mean(lengths[task])) if lengths[task] else 0.0} for task in tasks}


def _demo_keys(data) -> list[str]:
    return sorted(data, key=lambda name: int(name.split("_")[1]))


def demo_index(path: str | Path) -> list[DemoInfo]:
    """Per-demo metadata, without reading any frames."""
    import h5py

    with h5py.File(path, "r") as f:
        index = []
        for name in _demo_keys(f["data"]):
            a = f["data"][name].attrs
            index.append(DemoInfo(name, str(a["task"]), str(a["instruction"]), int(a["seed"]), int(a["num_samples"])))
        return index


def demo_cameras(path: str | Path) -> tuple[str, ...]:
    """The cameras a demonstration file recorded, in order (files before the attribute: corner2)."""
    import h5py

    with h5py.File(path, "r") as f:
        return tuple(str(c) for c in f.attrs.get("cameras", [CAMERA]))


def demo_image_size(path: str | Path) -> int:
    """The square image side of a demonstration file's frames."""
    import h5py

    with h5py.File(path, "r") as f:
        return int(f.attrs["image_size"])


def iter_demos(path: str | Path, cameras: tuple[str, ...] | None = None, names: list[str] | None = None):
    """The demos of a file (all, or the groups `names` from demo_index), read one at a time, frames
    included: images [T, C, S, S, 3] of `cameras` (default: all recorded). The cameras are checked
    here, before the first frame is read."""
    recorded = demo_cameras(path)
    cameras = recorded if cameras is None else tuple(cameras)
    missing = [c for c in cameras if c not in recorded]
    if missing:
        raise ValueError(f"{path} has no frames from camera(s) {', '.join(missing)}; it recorded {', '.join(recorded)}")
    return _read_demos(path, cameras, names)


def _read_demos(path, cameras: tuple[str, ...], names: list[str] | None):
    import h5py

    with h5py.File(path, "r") as f:
        for name in _demo_keys(f["data"]) if names is None else names:
            g = f["data"][name]
            images = np.stack([g[f"obs/{CAMERA_KEYS[c]}"][()] for c in cameras], axis=1)
            yield Demo(str(g.attrs["task"]), str(g.attrs["instruction"]), int(g.attrs["seed"]),
                       images, g["obs/proprio"][()], g["actions"][()])


def load_demos(path: str | Path, cameras: tuple[str, ...] | None = None, names: list[str] | None = None) -> list[Demo]:
    """iter_demos as a list."""
    return list(iter_demos(path, cameras, names))


data_app = typer.Typer(help="Demonstrations: scripted MetaWorld experts.", no_args_is_help=True)


@data_app.callback()
def _data_group() -> None:
    """Keeps `collect` a sub-command even while it is the only one."""


@data_app.command("collect")
def collect_command(
    out: Path = typer.Option(Path("data/metaworld_mt10.hdf5"), help="HDF5 file to write."),
    tasks: str = typer.Option("mt10", help="Comma-separated tasks or task sets (mt10, memory, all)."),
    episodes: int = typer.Option(40, help="Successful episodes per task."),
    seed_start: int = typer.Option(0, help="First episode seed of each task."),
    image_size: int = typer.Option(128, help="Square image side in pixels."),
    max_steps: int = typer.Option(200, help="Steps the expert gets to succeed."),
    workers: int = typer.Option(2, help="Worker processes."),
    wrist: bool = typer.Option(False, help="Also record the gripper camera (obs/eye_in_hand_rgb)."),
):
    """Run the scripted experts and keep the successful episodes."""
    try:
        names = parse_tasks(tasks)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--tasks") from None
    cameras = (CAMERA, WRIST_CAMERA) if wrist else (CAMERA,)
    stats = collect(out, names, episodes, seed_start, image_size, max_steps, workers, cameras=cameras)
    table = Table("task", "attempts", "successes", "mean length")
    for task, s in stats.items():
        table.add_row(task, str(s["attempts"]), str(s["successes"]), f"{s['mean_length']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
