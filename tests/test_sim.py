import numpy as np
import pytest

pytest.importorskip("metaworld")
pytest.importorskip("h5py")

from kvla.testbed.data import collect, demo_index, load_demos  # noqa: E402
from kvla.testbed.sim import SimEnv, expert_action  # noqa: E402


def first_observation(task: str, seed: int) -> dict[str, np.ndarray]:
    with SimEnv(task, seed, image_size=64) as env:
        return env.reset()


def test_same_seed_same_initial_state():
    a, b = first_observation("push-v3", 3), first_observation("push-v3", 3)
    assert np.array_equal(a["state"], b["state"])
    assert np.array_equal(a["image"], b["image"])
    assert a["image"].shape == (64, 64, 3) and a["image"].dtype == np.uint8 and a["image"].any()
    assert a["proprio"].dtype == np.float32 and np.array_equal(a["proprio"], a["state"][:4])


def test_different_seeds_different_initial_state():
    a, b = first_observation("push-v3", 3), first_observation("push-v3", 4)
    assert not np.allclose(a["state"], b["state"])


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


def test_expert_reaches_success():
    with SimEnv("reach-v3", 0, image_size=64, max_steps=150) as env:
        obs, success, done = env.reset(), False, False
        while not done:
            obs, success, done = env.step(expert_action("reach-v3", obs["state"]))
    assert success and env.steps < 150


def test_tiny_collect_round_trip(tmp_path):
    path = tmp_path / "demos.hdf5"
    stats = collect(path, ["reach-v3"], episodes_per_task=1, seed_start=5, image_size=64, workers=1, progress=False)
    assert stats["reach-v3"]["successes"] == 1
    (demo,) = load_demos(path)
    (info,) = demo_index(path)
    t = len(demo.actions)
    assert demo.task == info.task == "reach-v3" and demo.seed == info.seed == 5 and info.length == t
    assert demo.images.shape == (t, 64, 64, 3) and demo.images.dtype == np.uint8
    assert demo.proprio.shape == (t, 4) and demo.actions.shape == (t, 4) and demo.actions.dtype == np.float32
    assert np.abs(demo.actions).max() <= 1.0
    first = first_observation("reach-v3", 5)  # the recorded seed reproduces the episode's start
    assert np.array_equal(demo.images[0], first["image"])


def test_unknown_task():
    with pytest.raises(ValueError, match="reach-v9"):
        SimEnv("reach-v9", 0)
