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
    guard = FidelityGuard(every=2, bound=0.0, start_age=4, relax_after=1)
    policy = CachedVLAPolicy(model, "static:tau=0.0", guard=guard)  # reuses every token, whatever changed
    scene = [frames[0], frames[0], 255 - frames[0]]  # the scene changes completely at step 2
    outs = [policy.step(frame, text) for frame in scene]
    notes = [o.notes["guard"] for o in outs]
    assert [n["checked"] for n in notes] == [False, False, True]
    assert notes[2]["deviation"] > 0 and notes[2]["refreshed"] and notes[2]["max_age"] == 4
    assert (policy.state.source_step == 2).all()  # every token now comes from the full step of step 2
    expected = CachedVLAPolicy(model, "full").step(scene[2], text)
    assert torch.equal(outs[2].action_tokens, expected.action_tokens) and outs[2].reuse_ratio == 0.0
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
