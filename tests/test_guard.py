"""The fidelity guard: its checks against a full step, the refresh and tightening on a breach, the
relaxing after agreement, its per-step notes and per-episode summary, and reset()."""

import numpy as np
import pytest
import torch

from kvla.guard import FidelityGuard
from kvla.model.vla import VLAModel
from kvla.policy import CachedVLAPolicy


@pytest.fixture(scope="module")
def model():
    return VLAModel.from_preset("tiny", seed=0)


def _episode(model, steps=8, seed=0):
    """A scene that drifts a little every step (so reuse is approximate)."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(30, 220, (1, 32, 32, 3)).astype(np.int64)
    frames = []
    for _ in range(steps):
        frame = np.clip(frame + rng.integers(-6, 7, frame.shape), 0, 255)
        frames.append(torch.from_numpy(frame.astype(np.uint8)))
    return frames, torch.randint(3, 100, (1, model.config.num_text_tokens), generator=torch.Generator().manual_seed(seed))


def test_a_guard_that_checks_every_step_with_no_tolerance_gives_full_s_actions(model):
    frames, text = _episode(model)
    full = CachedVLAPolicy(model, "full")
    guarded = CachedVLAPolicy(model, "static:tau=0.0", guard=FidelityGuard(every=1, bound=0.0))
    for frame in frames:
        expected = full.step(frame, text)
        out = guarded.step(frame, text)
        assert torch.equal(out.action_tokens, expected.action_tokens)
    summary = guarded.guard_summary()
    assert summary["checks"] == len(frames) - 1 and summary["breaches"] >= 1
    assert 0.0 < summary["guard_share_of_step"] < 1.0


def test_a_breach_refreshes_the_cache_and_tightens_then_agreement_relaxes(model):
    frames, text = _episode(model, steps=10)
    guard = FidelityGuard(every=9, bound=0.0, start_age=4, relax_after=1)
    policy = CachedVLAPolicy(model, "static:tau=0.0", guard=guard)  # reuses every token, whatever changed
    scene = [frames[0]] * 9 + [255 - frames[0]]  # the scene changes completely at step 9
    outs = [policy.step(frame, text) for frame in scene]
    notes = [o.notes["guard"] for o in outs]
    assert [n["checked"] for n in notes] == [False] * 9 + [True]
    # the step reused K/V of age 9: the cap is start_age, 4 (below half of 9)
    assert notes[9]["deviation"] > 0 and notes[9]["refreshed"] and notes[9]["max_age"] == 4
    assert (policy.state.source_step == 9).all()  # every token now comes from the full step of step 9
    expected = CachedVLAPolicy(model, "full").step(scene[9], text)
    assert torch.equal(outs[9].action_tokens, expected.action_tokens) and outs[9].reuse_ratio == 0.0
    # a breach after reusing K/V of age 2 caps the age at 1 (half of 2), below start_age
    young = CachedVLAPolicy(model, "static:tau=0.0", guard=FidelityGuard(every=2, bound=0.0, start_age=4))
    last = [young.step(frame, text) for frame in (frames[0], frames[0], 255 - frames[0])][-1]
    assert last.notes["guard"]["refreshed"] and last.notes["guard"]["max_age"] == 1
    # with an unbounded tolerance, agreement relaxes the age again and lifts the cap past start_age
    policy.guard = FidelityGuard(every=1, bound=10.0, start_age=4, relax_after=1)
    memory = policy.guard.memory(policy.state)
    memory["max_age"] = 2
    policy.step(frames[3], text)
    assert memory["max_age"] == 4
    policy.step(frames[4], text)
    assert memory["max_age"] is None
    policy.reset()
    assert "guard" not in policy.state.method_memory


def test_the_age_cap_recomputes_old_tokens(model):
    frame, text = _episode(model, steps=1)[0][0], _episode(model, steps=1)[1]
    policy = CachedVLAPolicy(model, "static", guard=FidelityGuard(every=100, bound=1.0))
    policy.guard.memory(policy.state)["max_age"] = 2
    reuse = [policy.step(frame, text).reuse_ratio for _ in range(5)]
    # an unchanged frame: reused at ages 1, recomputed at age 2, and so on
    assert reuse == [0.0, 1.0, 0.0, 1.0, 0.0]


def test_guard_settings_and_where_it_runs(model):
    with pytest.raises(ValueError, match="would never check"):
        FidelityGuard(every=0)
    with pytest.raises(ValueError, match="on_change in"):
        FidelityGuard(on_change=2.0)
    policy = CachedVLAPolicy(model, "static", guard=FidelityGuard())
    with pytest.raises(ValueError, match="step_episodes does not apply it"):
        policy.step_episodes([policy.state], torch.zeros(1, 32, 32, 3, dtype=torch.uint8),
                             torch.zeros(1, model.config.num_text_tokens, dtype=torch.long))
    with pytest.raises(ValueError, match="has no guard"):
        CachedVLAPolicy(model, "static").guard_summary()


def test_a_scene_change_triggers_a_check(model):
    frames, text = _episode(model, steps=3)
    policy = CachedVLAPolicy(model, "static", guard=FidelityGuard(every=0, on_change=0.5))
    policy.step(frames[0], text)
    assert not policy.step(frames[0], text).notes["guard"]["checked"]  # nothing changed
    assert policy.step(255 - frames[0], text).notes["guard"]["checked"]  # everything changed


def test_guard_specs_in_method_lists():
    from kvla.guard import guard_label, split_guard

    method, guard = split_guard("vla_cache:tau=0.99|guard:every=5:bound=0.05")
    assert method == "vla_cache:tau=0.99" and guard == FidelityGuard(every=5, bound=0.05)
    assert split_guard("static") == ("static", None)
    assert guard_label(guard) == "|guard:every=5:bound=0.05" and guard_label(None) == ""
    with pytest.raises(ValueError, match="bad guard setting 'often=2'"):
        split_guard("static|guard:often=2")


def test_a_guarded_method_in_the_fidelity_proxy(tmp_path, model):
    """run_fidelity with a guard that checks every step with no tolerance agrees with full exactly."""
    from test_training import CAMERA, TINY, WRIST_CAMERA, _write_demo_file

    from kvla.model.reference import InstructionTokenizer, reference_config
    from kvla.testbed.data import load_demos
    from kvla.testbed.evaluate import run_fidelity
    from kvla.testbed.sim import TASKS

    path = tmp_path / "demos.hdf5"
    _write_demo_file(path, (CAMERA, WRIST_CAMERA), episodes_per_task=1, length=7, tasks=("reach-v3",))
    tokenizer = InstructionTokenizer.from_instructions(list(TASKS.values()))
    torch.manual_seed(0)
    vla = VLAModel(reference_config(tokenizer, parallel=True, action_chunk=1, num_layers=2, num_cameras=2, **TINY)).eval()
    records = run_fidelity(vla, tokenizer, load_demos(path), ["static:tau=0.0|guard:every=1:bound=0.0", "static:tau=0.0"],
                           progress=False)
    by_label = {r.method: r for r in records}
    assert by_label["static:tau=0.0|guard:every=1:bound=0.0"].token_agreement == 1.0
    assert by_label["static:tau=0.0"].reuse_ratio > 0


def test_closed_loop_on_a_photometric_task_with_a_guarded_method(tmp_path):
    pytest.importorskip("metaworld")
    from test_testbed import _tiny_reference

    from kvla.testbed.evaluate import run_closed_loop
    from kvla.testbed.sim import SimEnv, parse_tasks

    assert parse_tasks("mt10@flicker")[0] == "reach-v3@flicker"
    with SimEnv("reach-v3@flicker", 3, image_size=32) as env, SimEnv("reach-v3", 3, image_size=32) as plain:
        pairs = [(env.reset()["images"], plain.reset()["images"])]
        for _ in range(5):
            pairs.append((env.step(np.zeros(4))[0]["images"], plain.step(np.zeros(4))[0]["images"]))
    from kvla.testbed.sim import flicker

    for step, (perturbed, original) in enumerate(pairs):  # the light changes, not the scene
        assert np.array_equal(perturbed, flicker(original, step))
    assert any(not np.array_equal(p, o) for p, o in pairs)
    model, tokenizer = _tiny_reference()
    model.save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    results = run_closed_loop(str(tmp_path), ["full", "static|guard:every=2"], ["reach-v3@flicker"], 1, max_steps=6,
                              workers=1, progress=False)
    guarded = results[0][1]
    assert guarded.method == "static|guard:every=2" and guarded.guard["checks"] >= 2
