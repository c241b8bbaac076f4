"""Record one short MetaWorld v3 scripted-expert episode as a test fixture.

Renders the "corner2" camera (moved closer to the table, as LeRobot does) offscreen on
CPU, flips it upright, and saves ``frames`` uint8 [T,H,W,3] and the expert's ``actions``
float32 [T,4] (``actions[t]`` is taken at the state shown in ``frames[t]``; ``frames[0]``
is the reset state) plus scalar metadata ``task``, ``seed``, ``camera``, ``instruction``.

Needs the Debian packages libegl1, libgl1-mesa-dri and libosmesa6 (it only reports
missing ones). Example:

    .venv/bin/python scripts/record_frames.py  # MUJOCO_GL=egl|osmesa to force a backend
"""

import argparse
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path


def _egl_works() -> bool:
    """Probe EGL in a child process (the GL backend is fixed once mujoco is imported)."""
    probe = "import mujoco; mujoco.GLContext(8, 8).make_current()"
    env = {**os.environ, "MUJOCO_GL": "egl"}
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


# Offscreen CPU rendering: Mesa software EGL, else OSMesa (unless MUJOCO_GL is already set).
if "MUJOCO_GL" not in os.environ:
    os.environ["MUJOCO_GL"] = "egl" if _egl_works() else "osmesa"
if os.environ["MUJOCO_GL"] == "osmesa":
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

import metaworld  # noqa: E402
from metaworld.policies import ENV_POLICY_MAP  # noqa: E402

# The experts' proportional gains exceed the action range and warn on every step.
warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
GL_PACKAGES = ("libegl1", "libgl1-mesa-dri", "libosmesa6")
INSTRUCTIONS = {
    "pick-place-v3": "pick up the puck and place it at the goal",
    "push-v3": "push the puck to the goal",
    "reach-v3": "reach the goal position",
}
CAMERA = "corner2"
CAMERA_POS = (0.75, 0.075, 0.7)  # LeRobot's closer pose for corner2
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/kvla/fixtures/metaworld_frames.npz"


def missing_gl_packages() -> list[str]:
    """Return the offscreen-GL Debian packages that dpkg does not report as installed."""
    def installed(pkg: str) -> bool:
        cmd = ["dpkg-query", "-W", "-f=${Status}", pkg]
        return "install ok installed" in subprocess.run(cmd, capture_output=True, text=True).stdout

    return [p for p in GL_PACKAGES if not installed(p)] if shutil.which("dpkg-query") else []


def record(task: str, seed: int, steps: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Run the scripted expert for ``steps`` control steps; return (frames, actions)."""
    mt1 = metaworld.MT1(task, seed=seed)  # seeded: the task's object/goal placement is fixed
    env = mt1.train_classes[task](render_mode="rgb_array", camera_name=CAMERA, width=size, height=size)
    env.set_task(mt1.train_tasks[0])
    env.model.cam_pos[mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, CAMERA)] = CAMERA_POS
    env.model.vis.quality.offsamples = 0  # no multisampling: must be set before the first render
    flags = env.mujoco_renderer._get_viewer("rgb_array").scn.flags
    flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    policy = ENV_POLICY_MAP[task]()
    obs, _ = env.reset()
    frames, actions = [], []
    try:
        for _ in range(steps):
            frames.append(env.render()[::-1, ::-1].copy())  # corner2 renders upside down
            actions.append(np.clip(policy.get_action(obs), -1.0, 1.0).astype(np.float32))
            obs, *_ = env.step(actions[-1])  # the env clips to [-1, 1] too
    finally:
        env.close()
    return np.stack(frames), np.stack(actions)


def contact_sheet(frames: np.ndarray, path: Path) -> None:
    """Save frames first, 1/3, 2/3 and last side by side as a PNG."""
    from PIL import Image

    t = len(frames) - 1
    idx = [0, t // 3, 2 * t // 3, t]
    Image.fromarray(np.concatenate([frames[i] for i in idx], axis=1)).save(path)


def static_patch_fraction(frames: np.ndarray, patch: int = 14, thresh: float = 0.996) -> float:
    """Median over steps of the fraction of patches with cosine(prev, next) >= thresh."""
    t, h, w, c = frames.shape
    p = frames.astype(np.float64).reshape(t, h // patch, patch, w // patch, patch, c)
    p = p.transpose(0, 1, 3, 2, 4, 5).reshape(t, -1, patch * patch * c)
    a, b = p[:-1], p[1:]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-8)
    return float(np.median((cos >= thresh).mean(-1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="pick-place-v3", choices=sorted(INSTRUCTIONS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--sheet", type=Path, default=Path("/tmp/frames_sheet.png"))
    args = ap.parse_args()

    if missing := missing_gl_packages():
        print(f"warning: missing Debian packages for offscreen GL: {' '.join(missing)}")
    frames, actions = record(args.task, args.seed, args.steps, args.size)
    if frames.max() == 0:
        raise SystemExit("all frames are black: offscreen rendering failed")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out, frames=frames, actions=actions, task=np.str_(args.task), seed=np.int64(args.seed),
        camera=np.str_(CAMERA), instruction=np.str_(INSTRUCTIONS[args.task]),
    )
    contact_sheet(frames, args.sheet)
    print(f"MUJOCO_GL={os.environ['MUJOCO_GL']}")
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): frames {frames.shape}, "
          f"actions {actions.shape}; contact sheet {args.sheet}")
    print(f"static 14x14 patches (cos >= 0.996, median over steps): {static_patch_fraction(frames):.3f}")


if __name__ == "__main__":
    main()
