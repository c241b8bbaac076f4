"""MetaWorld v3 tasks rendered offscreen on the CPU, with their scripted experts.

Closed-loop evaluation is paired across methods by seed, so a seed fixes the whole initial
state (object and goal positions) and the rendering. metaworld is imported lazily: importing
this module is cheap and works without the ``sim`` extra installed.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

# The task set, in one place: MT10, each with a plain English instruction.
TASKS: dict[str, str] = {
    "reach-v3": "reach the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button down from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}


@dataclass(frozen=True)
class MemoryVariant:
    """A task whose goal marker is shown only during the first steps of the episode.

    After `visible_steps` env steps the marker is hidden, so a policy that does not remember the
    first frames cannot know where the goal is: without such tasks a testbed cannot tell a good
    history method from one that drops the history. The marker is drawn larger than MetaWorld's
    (radius `marker_radius` m instead of 0.02) so that one early frame shows it clearly at 128 px.
    """

    base: str  # the MT10 task it varies (its expert, its success test, its instruction)
    visible_steps: int = 8
    marker_radius: float = 0.04


# Memory variants of the MT10 tasks whose goal is a marker in the scene.
MEMORY_TASKS: dict[str, MemoryVariant] = {
    "reach-hidden-goal-v3": MemoryVariant("reach-v3"),
    "push-hidden-goal-v3": MemoryVariant("push-v3"),
    "pick-place-hidden-goal-v3": MemoryVariant("pick-place-v3"),
}
# ---------------------------------------------------------------- photometric perturbations
# Photometric perturbations of camera frames: what real robots meet and rendered demos lack.
#
# Each is a function (uint8 frames [..., H, W, 3], env step) -> uint8 frames of the same shape,
# deterministic in the step, applied to every camera. The scene does not change; only the light
# does, so a change detector that reuses across them keeps K/V computed under other light.


def _scaled(frames: np.ndarray, gain) -> np.ndarray:
    return np.clip(frames.astype(np.float32) * gain, 0, 255).round().astype(np.uint8)


def flicker_dimmed(step: int) -> bool:
    """Whether env step `step` is a dim one: half of the steps, in an irregular but fixed pattern
    (mains flicker aliased against the frame rate), so that a policy observing every K-th step
    sees it whatever K is."""
    return bool(((step * 0x9E3779B1) & 0xFFFFFFFF) >> 31)


def flicker(frames: np.ndarray, step: int) -> np.ndarray:
    """Half of the frames at 80 % brightness (flicker_dimmed)."""
    return _scaled(frames, 0.8) if flicker_dimmed(step) else frames


def exposure_ramp(frames: np.ndarray, step: int) -> np.ndarray:
    """Auto-exposure settling: brightness falls linearly from 100 % to 60 % over the first 100 steps."""
    return _scaled(frames, 1.0 - 0.4 * min(step, 100) / 100)


def colour_shift(frames: np.ndarray, step: int) -> np.ndarray:
    """White balance jumping at step 10: red up 10 %, blue down 10 %."""
    return _scaled(frames, np.array([1.1, 1.0, 0.9], np.float32)) if step >= 10 else frames


def shadow(frames: np.ndarray, step: int) -> np.ndarray:
    """A shadow band a quarter of the frame wide at 60 % brightness, crossing the frame every 40 steps."""
    width = frames.shape[-2]
    band = max(1, width // 4)
    start = int((step % 40) / 40 * (width + band)) - band
    out = frames.copy()
    lo, hi = max(0, start), min(width, start + band)
    if hi > lo:
        out[..., lo:hi, :] = _scaled(frames[..., lo:hi, :], 0.6)
    return out


PERTURBATIONS = {"flicker": flicker, "exposure_ramp": exposure_ramp, "colour_shift": colour_shift, "shadow": shadow}


def perturbation(name: str | None):
    """The perturbation called `name` (None or "none": frames unchanged)."""
    if name in (None, "none"):
        return None
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose from none, {', '.join(PERTURBATIONS)}")
    return PERTURBATIONS[name]


def _photometric_names() -> tuple[str, ...]:
    return tuple(PERTURBATIONS)


# Photometric variants of the MT10 tasks, "<task>@<perturbation>" (the perturbations above): the same
# scene, expert and success test, every camera frame perturbed at its env step (flicker, exposure...)
PHOTOMETRIC_TASKS: dict[str, str] = {f"{task}@{name}": TASKS[task] for name in _photometric_names() for task in TASKS}
# every task kvla can run, with its instruction (a variant says what its base task says)
ALL_TASKS: dict[str, str] = TASKS | {name: TASKS[v.base] for name, v in MEMORY_TASKS.items()} | PHOTOMETRIC_TASKS
# named task sets for the CLI's --tasks: mt10, memory, and mt10@flicker, mt10@exposure_ramp, ...
TASK_SETS: dict[str, tuple[str, ...]] = {"mt10": tuple(TASKS), "memory": tuple(MEMORY_TASKS)} | {
    f"mt10@{name}": tuple(f"{task}@{name}" for task in TASKS) for name in _photometric_names()}


def base_task(task: str) -> str:
    """The MetaWorld task behind `task` (itself for an MT10 task)."""
    _check_task(task)
    task = task.split("@")[0]
    return MEMORY_TASKS[task].base if task in MEMORY_TASKS else task


def task_perturbation(task: str):
    """The photometric perturbation of a "<task>@<name>" variant, or None."""
    _check_task(task)
    return perturbation(task.split("@")[1]) if "@" in task else None


def parse_tasks(text: str) -> list[str]:
    """Comma-separated task names or set names (mt10, memory, all) -> task names, checked."""
    names: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item == "all":  # the MT10 tasks and their memory variants (the photometric ones by their sets)
            names += list(TASKS) + list(MEMORY_TASKS)
        elif item in TASK_SETS:
            names += list(TASK_SETS[item])
        else:
            _check_task(item)
            names.append(item)
    if not names:
        raise ValueError("no task named")
    return list(dict.fromkeys(names))


GL_PACKAGES = ("libegl1", "libgl1-mesa-dri", "libosmesa6")
CAMERA = "corner2"  # the third-person camera (agentview)
CAMERA_POS = (0.75, 0.075, 0.7)  # corner2 moved closer: objects are tiny at 128 px otherwise
WRIST_CAMERA = "gripperPOV"  # mounted on the gripper: the close view OpenVLA-OFT adds
CAMERAS = (CAMERA, WRIST_CAMERA)
# every camera of MetaWorld's Sawyer scene
KNOWN_CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
# Cameras whose raw render is upside down (and mirrored); the others render upright.
_FLIPPED_CAMERAS = {CAMERA}
VARIATIONS_PER_BENCHMARK = 50  # MT1 makes this many task variations per benchmark seed


def missing_gl_packages() -> list[str]:
    """The Debian packages for offscreen GL that are not installed ([] off Debian)."""
    if not shutil.which("dpkg-query"):
        return []

    def installed(pkg: str) -> bool:
        cmd = ["dpkg-query", "-W", "-f=${Status}", pkg]
        return "install ok installed" in subprocess.run(cmd, capture_output=True, text=True).stdout

    return [p for p in GL_PACKAGES if not installed(p)]


def _egl_works() -> bool:
    """Probe EGL in a child process: the GL backend is fixed once mujoco is imported."""
    probe = "import mujoco; mujoco.GLContext(8, 8).make_current()"
    env = {**os.environ, "MUJOCO_GL": "egl"}
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


def _setup_lock_path() -> str:
    return os.path.join(tempfile.gettempdir(), "kvla-gl-setup.lock")


def ensure_rendering() -> None:
    """Make offscreen rendering work; call before mujoco is imported (child processes inherit it).

    Installs the missing GL packages when root (otherwise says exactly what to install), then
    picks the backend: Mesa EGL, else OSMesa, unless MUJOCO_GL is already set. Safe to call from
    several processes at once: the check and the install run under one machine-wide file lock,
    so a second process waits for the first one's install instead of racing it for dpkg's lock.
    """
    if missing := missing_gl_packages():
        if os.geteuid() != 0:  # before the lock: a lock file root made may not be ours to open
            command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
            raise RuntimeError(f"offscreen rendering needs the Debian packages {', '.join(missing)}: "
                               f"run `sudo apt-get update && sudo {' '.join(command)}`")
        with open(_setup_lock_path(), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if missing := missing_gl_packages():  # again: another process may have installed them
                command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
                env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
                for step in (["apt-get", "update", "-q"], command):
                    done = subprocess.run(step, env=env, capture_output=True, text=True)
                    if done.returncode:
                        raise RuntimeError(f"`{' '.join(step)}` failed (exit {done.returncode}) while installing "
                                           f"the GL packages {', '.join(missing)}:\n{done.stderr.strip()[-2000:]}")
    if "MUJOCO_GL" not in os.environ:  # without it MuJoCo tries GLFW, which needs a display
        os.environ["MUJOCO_GL"] = "egl" if _egl_works() else "osmesa"
    if os.environ["MUJOCO_GL"] == "osmesa":
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")


@functools.cache
def _metaworld():
    """Import metaworld, with offscreen rendering set up first."""
    if importlib.util.find_spec("metaworld") is None:
        raise ImportError("the MetaWorld simulator is not installed: pip install 'kvla[sim]'")
    ensure_rendering()
    import metaworld
    import metaworld.policies

    return metaworld


@functools.lru_cache(maxsize=16)
def _benchmark(task: str, benchmark_seed: int):
    return _metaworld().MT1(task, seed=benchmark_seed)


def _env_for_seed(task: str, seed: int, **kwargs):
    """A new env with the MT1 task variation (object/goal placement) that the seed picks.

    Building an MT1 benchmark costs ~0.7 s and yields 50 variations, so seed s takes variation
    s % 50 of the benchmark seeded s // 50: deterministic, and distinct across seeds in practice.
    """
    block, index = divmod(seed, VARIATIONS_PER_BENCHMARK)
    benchmark = _benchmark(task, block)
    env = benchmark.train_classes[task](**kwargs)
    env.set_task(benchmark.train_tasks[index])
    env.seed(seed)
    return env


def _check_task(task: str) -> None:
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(list(TASKS) + list(MEMORY_TASKS))}, "
                         f"a task@perturbation ({', '.join(_photometric_names())}), or the sets {', '.join(TASK_SETS)}")


@functools.cache
def _policy(task: str):
    return _metaworld().policies.ENV_POLICY_MAP[task]()


def expert_action(task: str, state: np.ndarray) -> np.ndarray:
    """The scripted expert's action float32 [4] at the full 39-d state, clipped to [-1, 1]."""
    task = base_task(task)
    with warnings.catch_warnings():  # the experts' gains exceed the action range and warn every step
        warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
        action = _policy(task).get_action(np.asarray(state, dtype=np.float64))
    return np.clip(action, -1.0, 1.0).astype(np.float32)


class SimEnv:
    """One MetaWorld v3 task at one seed, rendered upright from one or more cameras.

    ``cameras`` are MetaWorld camera names, the first being the main view (default: corner2
    only; ``CAMERAS`` adds the wrist camera). ``reset()`` gives the observation dict
    ``{"images": uint8 [C,S,S,3] (cameras in order), "image": the first camera's [S,S,3],
    "proprio": float32 [4] (hand xyz, gripper opening), "state": float32 [39]}``; ``step(action)`` gives
    ``(obs, success, done)`` with ``done`` once the task succeeds or ``max_steps`` steps are
    taken (default: the env's max_path_length, 500). Close it (or use ``with``) before making
    the next one: a garbage-collected viewer can blank the frames of a live env.
    """

    def __init__(self, task: str, seed: int, image_size: int = 128, max_steps: int | None = None,
                 cameras: tuple[str, ...] = (CAMERA,)):
        _check_task(task)
        if not cameras or len(set(cameras)) != len(cameras):
            raise ValueError(f"SimEnv needs one or more distinct cameras, got {cameras}")
        if unknown := [c for c in cameras if c not in KNOWN_CAMERAS]:
            raise ValueError(f"MetaWorld has no camera {', '.join(map(repr, unknown))}; known: {', '.join(KNOWN_CAMERAS)}")
        _metaworld()  # sets up GL before mujoco is first imported
        import mujoco

        self.task, self.seed, self.image_size = task, seed, image_size
        self.instruction = ALL_TASKS[task]
        self.memory = MEMORY_TASKS.get(task)
        self.perturbation = task_perturbation(task)
        env = _env_for_seed(base_task(task), seed, render_mode="rgb_array", camera_name=CAMERA,
                            width=image_size, height=image_size)
        self.max_steps = env.max_path_length if max_steps is None else max_steps
        env.max_path_length = self.max_steps  # the env itself refuses to step past this
        env.model.cam_pos[mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, CAMERA)] = CAMERA_POS
        env.model.vis.quality.offsamples = 0  # no multisampling: must be set before the first render
        self._viewer = env.mujoco_renderer._get_viewer("rgb_array")
        self._viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0  # shadows and reflections cost
        self._viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0  # most of a software render
        self._camera_ids = [mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, name) for name in cameras]
        self.cameras = tuple(cameras)
        self._goal_site = mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_SITE, "goal")
        if self.memory is not None:
            if self._goal_site < 0:
                raise ValueError(f"{self.memory.base} has no goal marker to hide")
            env.model.site_size[self._goal_site, 0] = self.memory.marker_radius
            self._goal_rgba = env.model.site_rgba[self._goal_site].copy()
        self._env: Any = env
        self.steps = 0

    def _render(self, name: str, camera_id: int) -> np.ndarray:
        image = self._viewer.render(render_mode="rgb_array", camera_id=camera_id)
        return (image[::-1, ::-1] if name in _FLIPPED_CAMERAS else image).copy()

    def _observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        if self.memory is not None:  # the marker shows in the frames of the first visible_steps steps only
            shown = self.steps < self.memory.visible_steps
            self._live_env.model.site_rgba[self._goal_site, 3] = self._goal_rgba[3] if shown else 0.0
        self._viewer.make_context_current()  # in case another env rendered since
        images = np.stack([self._render(name, cid) for name, cid in zip(self.cameras, self._camera_ids)])
        if not images.reshape(len(images), -1).any(1).all():  # the scene is lit: all black = GL context lost
            raise RuntimeError(
                "MetaWorld rendered an all-black frame: the GL context was lost, most likely because an "
                "earlier env was garbage-collected while this one was live. Keep no reference to an env "
                "after closing it (SimEnv.close releases its own)."
            )
        if self.perturbation is not None:  # the light changes, not the scene
            images = self.perturbation(images, self.steps)
        state = state.astype(np.float32)
        return {"images": images, "image": images[0], "proprio": state[:4].copy(), "state": state}

    @property
    def _live_env(self) -> Any:
        if self._env is None:
            raise RuntimeError("the env is closed")
        return self._env

    def reset(self) -> dict[str, np.ndarray]:
        self.steps = 0
        state, _ = self._live_env.reset()
        return self._observation(state)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool, bool]:
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        state, _, _, _, info = self._live_env.step(action)
        self.steps += 1
        success = bool(info["success"])
        return self._observation(state), success, success or self.steps >= self.max_steps

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = self._viewer = None

    def __enter__(self) -> SimEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
