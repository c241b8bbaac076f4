"""The simulator (with the sim extra installed), and the GL setup, which needs no simulator."""

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvla.testbed import sim
from kvla.testbed.data import collect, demo_index, load_demos
from kvla.testbed.sim import SimEnv, expert_action

needs_sim = pytest.mark.skipif(
    importlib.util.find_spec("metaworld") is None or importlib.util.find_spec("h5py") is None,
    reason="needs the sim extra (metaworld, h5py)",
)


def first_observation(task: str, seed: int) -> dict[str, np.ndarray]:
    with SimEnv(task, seed, image_size=64) as env:
        return env.reset()


@needs_sim
def test_same_seed_same_initial_state():
    a, b = first_observation("push-v3", 3), first_observation("push-v3", 3)
    assert np.array_equal(a["state"], b["state"])
    assert np.array_equal(a["image"], b["image"])
    assert a["image"].shape == (64, 64, 3) and a["image"].dtype == np.uint8 and a["image"].any()
    assert a["proprio"].dtype == np.float32 and np.array_equal(a["proprio"], a["state"][:4])


@needs_sim
def test_different_seeds_different_initial_state():
    a, b = first_observation("push-v3", 3), first_observation("push-v3", 4)
    assert not np.allclose(a["state"], b["state"])


@needs_sim
def test_lost_gl_context_is_an_error_not_a_black_frame():
    """A closed env collected while another is live blanks the live env's frames; that must raise."""
    import gc

    with SimEnv("reach-v3", 0, image_size=64) as first:
        stale = first._live_env  # a reference kept past close, as a user's loop might
    with SimEnv("reach-v3", 0, image_size=64) as second:
        del stale
        gc.collect()
        with pytest.raises(RuntimeError, match="all-black frame"):
            second.reset()
    assert first_observation("reach-v3", 0)["image"].any()  # a fresh env renders again


@needs_sim
def test_expert_reaches_success():
    with SimEnv("reach-v3", 0, image_size=64, max_steps=150) as env:
        obs, success, done = env.reset(), False, False
        while not done:
            obs, success, done = env.step(expert_action("reach-v3", obs["state"]))
    assert success and env.steps < 150


@needs_sim
def test_tiny_collect_round_trip(tmp_path):
    path = tmp_path / "demos.hdf5"
    stats = collect(path, ["reach-v3"], episodes_per_task=1, seed_start=5, image_size=64, workers=1, progress=False)
    assert stats["reach-v3"]["successes"] == 1
    (demo,) = load_demos(path)
    (info,) = demo_index(path)
    t = len(demo.actions)
    assert demo.task == info.task == "reach-v3" and demo.seed == info.seed == 5 and info.length == t
    assert demo.images.shape == (t, 1, 64, 64, 3) and demo.images.dtype == np.uint8  # [T, cameras, S, S, 3]
    assert demo.proprio.shape == (t, 4) and demo.actions.shape == (t, 4) and demo.actions.dtype == np.float32
    assert np.abs(demo.actions).max() <= 1.0
    first = first_observation("reach-v3", 5)  # the recorded seed reproduces the episode's start
    assert np.array_equal(demo.images[0, 0], first["image"])


@needs_sim
def test_wrist_camera_round_trip(tmp_path):
    """Both cameras: the main view is the one-camera env's image, the wrist view its own, and a
    collected episode starts with exactly the frames a fresh env shows."""
    with SimEnv("push-v3", 3, image_size=64, cameras=sim.CAMERAS) as env:
        both = env.reset()
        moved = both
        for _ in range(8):
            moved, _, _ = env.step(expert_action("push-v3", moved["state"]))
    assert both["images"].shape == (2, 64, 64, 3) and np.array_equal(both["image"], both["images"][0])
    assert np.array_equal(both["images"][0], first_observation("push-v3", 3)["image"])
    assert not np.array_equal(both["images"][0], both["images"][1])
    # the wrist camera rides on the hand: it changes more than the fixed view when the hand moves
    change = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()
    assert change(moved["images"][1], both["images"][1]) > change(moved["images"][0], both["images"][0])

    path = tmp_path / "demos.hdf5"
    collect(path, ["reach-v3"], episodes_per_task=1, seed_start=5, image_size=64, workers=1, progress=False,
            cameras=sim.CAMERAS)
    (demo,) = load_demos(path)
    assert demo.images.shape[1:] == (2, 64, 64, 3)
    with SimEnv("reach-v3", 5, image_size=64, cameras=sim.CAMERAS) as env:
        assert np.array_equal(demo.images[0], env.reset()["images"])
    assert np.array_equal(load_demos(path, (sim.WRIST_CAMERA,))[0].images[:, 0], demo.images[:, 1])


def test_bad_cameras_are_refused_before_an_env_is_made():
    with pytest.raises(ValueError, match="no camera 'wrist'"):
        SimEnv("reach-v3", 0, cameras=("corner2", "wrist"))
    with pytest.raises(ValueError, match="distinct"):
        SimEnv("reach-v3", 0, cameras=("corner2", "corner2"))
    with pytest.raises(ValueError, match="distinct"):
        collect("unused.hdf5", ["reach-v3"], cameras=("corner2", "corner2"))


@needs_sim
def test_unknown_task():
    with pytest.raises(ValueError, match="reach-v9"):
        SimEnv("reach-v9", 0)


# ------------------------------------------------------------------ GL setup
# One eval worker process: ensure_rendering with stand-ins for the package check and apt-get, so
# nothing is installed. The GL packages are "missing" until a fake install (which takes a while)
# finishes; every check, apt-get start and end is appended to a shared log with a timestamp.
_SETUP_WORKER = textwrap.dedent('''
    import os, subprocess, sys, time
    from pathlib import Path

    from kvla.testbed import sim

    work = Path(sys.argv[1])
    installed, pid = work / "installed", os.getpid()
    log_fd = os.open(work / "log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def log(event):
        os.write(log_fd, f"{time.monotonic():.6f} {pid} {event}\\n".encode())  # one O_APPEND write a line

    def wait_for(condition):
        deadline = time.monotonic() + 300
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the other setup process never arrived")
            time.sleep(0.001)

    checks = 0

    def missing_gl_packages():
        global checks
        checks += 1
        missing = [] if installed.exists() else ["libegl1"]
        log(f"check {checks} {','.join(missing) or '-'}")
        if checks == 1:  # the race: both processes see the packages missing before either installs
            (work / f"checked-{pid}").touch()
            wait_for(lambda: len(list(work.glob("checked-*"))) == 2)
        return missing

    def apt_get(step, **kwargs):
        log("start " + " ".join(step))
        time.sleep(0.3)
        if step[1] == "install":
            installed.touch()
        log("end " + " ".join(step))
        return subprocess.CompletedProcess(step, 0, "", "")

    sim.missing_gl_packages = missing_gl_packages
    sim.subprocess.run = apt_get
    sim._setup_lock_path = lambda: str(work / "setup.lock")
    sim.os.geteuid = lambda: 0
    os.environ["MUJOCO_GL"] = "osmesa"  # skip the EGL probe
    sim.ensure_rendering()
''')


def test_concurrent_setup_installs_once_and_never_concurrently(tmp_path):
    workers = [subprocess.Popen([sys.executable, "-c", _SETUP_WORKER, str(tmp_path)], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(err for _, err in outputs)

    events = [line.split(" ", 2) for line in (tmp_path / "log").read_text().splitlines()]
    events = [(float(t), int(pid), event) for t, pid, event in events]
    assert {pid for _, pid, _ in events} == {w.pid for w in workers}

    # apt-get runs never overlap, whichever process runs them
    runs, open_run = [], None
    for t, pid, event in sorted(events):
        if event.startswith("start "):
            assert open_run is None, f"{event!r} in {pid} while {open_run[1]} ran apt-get"
            open_run = (t, pid)
        elif event.startswith("end "):
            runs.append((open_run[1], event[len("end "):], open_run[0], t))
            open_run = None
    installs = [run for run in runs if " install " in run[1]]
    assert len(installs) == 1, runs  # the second process does not install again
    installer, _, _, install_end = installs[0]
    assert [run[0] for run in runs] == [installer, installer]  # update + install, by one process

    # the other process re-checked under the lock, after the install, and found nothing missing
    other = next(w.pid for w in workers if w.pid != installer)
    rechecks = [(t, event) for t, pid, event in events if pid == other and event.startswith("check 2")]
    assert len(rechecks) == 1 and rechecks[0][1] == "check 2 -" and rechecks[0][0] >= install_end


def test_setup_without_root_names_the_exact_command(monkeypatch, tmp_path):
    monkeypatch.setattr(sim, "missing_gl_packages", lambda: ["libegl1", "libosmesa6"])
    monkeypatch.setattr(sim, "_setup_lock_path", lambda: str(tmp_path / "setup.lock"))
    monkeypatch.setattr(sim.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sim.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a} without root"))
    expected = "`sudo apt-get update && sudo apt-get install -y --no-install-recommends libegl1 libosmesa6`"
    with pytest.raises(RuntimeError, match="libegl1, libosmesa6") as error:
        sim.ensure_rendering()
    assert expected in str(error.value)


def test_setup_reports_a_failed_apt_get_step(monkeypatch, tmp_path):
    steps = []

    def apt_get(step, **kwargs):
        steps.append(step)
        return subprocess.CompletedProcess(step, 100 if "install" in step else 0, "", "E: Could not get lock")

    monkeypatch.setattr(sim, "missing_gl_packages", lambda: ["libegl1"])
    monkeypatch.setattr(sim, "_setup_lock_path", lambda: str(tmp_path / "setup.lock"))
    monkeypatch.setattr(sim.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sim.subprocess, "run", apt_get)
    with pytest.raises(RuntimeError, match=r"install -y --no-install-recommends libegl1` failed \(exit 100\)"
                                           r"[\s\S]*E: Could not get lock"):
        sim.ensure_rendering()
    assert [s[:2] for s in steps] == [["apt-get", "update"], ["apt-get", "install"]]
