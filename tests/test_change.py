"""Change rules against values computed here by hand: the paper's cosine rule is blind to a
uniform brightness change and a colour cast; the photometric rule sees both, and contrast, and
lets sensor noise pass."""

import numpy as np
import pytest
import torch

from kvla.methods import parse_method
from kvla.methods.change import patch_similarity

CELL = 8


def _patch(seed=0, low=60, high=200):
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, (CELL, CELL, 3)).astype(np.float32)


def _as_tokens(*patches):
    return torch.from_numpy(np.stack([p.reshape(-1) for p in patches]))[None]  # [1, V, cell*cell*3], RGB fastest


def test_a_dimmed_patch_keeps_cosine_one_but_fails_the_photometric_check():
    source = _patch()
    dimmed = source * 0.8
    cosine = patch_similarity(_as_tokens(dimmed), _as_tokens(source), "cosine")
    assert cosine.item() == pytest.approx(1.0, abs=1e-6)
    # by hand: every channel mean moves by 0.2 x its mean (about 26 levels), far past 2
    assert np.abs(dimmed.mean((0, 1)) - source.mean((0, 1))).max() > 20
    assert patch_similarity(_as_tokens(dimmed), _as_tokens(source), "photometric").item() == 0.0


def test_a_colour_cast_and_a_contrast_change_are_seen():
    grey = np.full((CELL, CELL, 3), 128.0, np.float32) + _patch(1, -10, 10)
    cast = grey * np.array([1.1, 1.0, 1.0], np.float32)  # a 10 % red cast (white balance)
    assert patch_similarity(_as_tokens(cast), _as_tokens(grey), "cosine").item() > 0.996  # the paper's tau: static
    assert patch_similarity(_as_tokens(cast), _as_tokens(grey), "photometric").item() == 0.0
    textured = _patch(2)
    mean = textured.mean((0, 1), keepdims=True)
    flatter = mean + 0.7 * (textured - mean)  # contrast down, every channel mean unchanged
    assert np.abs(flatter.mean((0, 1)) - textured.mean((0, 1))).max() < 1e-3
    assert patch_similarity(_as_tokens(flatter), _as_tokens(textured), "photometric").item() == 0.0


def test_an_unchanged_patch_under_sensor_noise_passes_both():
    rng = np.random.default_rng(3)
    scene = _patch(4)
    before = scene + rng.normal(0, 2.0, scene.shape).astype(np.float32)
    after = scene + rng.normal(0, 2.0, scene.shape).astype(np.float32)
    cosine = patch_similarity(_as_tokens(after), _as_tokens(before), "cosine").item()
    photometric = patch_similarity(_as_tokens(after), _as_tokens(before), "photometric").item()
    assert cosine > 0.996 and photometric == pytest.approx(cosine)


def test_a_content_change_is_seen_by_both():
    source, moved = _patch(5), np.roll(_patch(5), 3, axis=1)
    moved[:, :3] = 0
    for rule in ("cosine", "photometric"):
        assert patch_similarity(_as_tokens(moved), _as_tokens(source), rule).item() < 0.996


def test_per_token_and_per_rule_settings():
    source = [_patch(6), _patch(7)]
    now = [source[0] * 0.8, source[1]]  # a local change: one patch in shadow
    similarity = patch_similarity(_as_tokens(*now), _as_tokens(*source), "photometric")
    assert similarity[0, 0].item() == 0.0 and similarity[0, 1].item() == pytest.approx(1.0)
    assert parse_method("static:change=photometric:levels=4").levels == 4.0
    assert parse_method("vla_cache:change=cosine").change == "cosine"  # the paper's rule, as a setting
    # the default a robot owner gets sees light changes (BENCHMARKS.md says why)
    assert {parse_method(m).change for m in ("static", "vla_cache", "lac")} == {"photometric"}
    from kvla.methods import OFFICIAL_CODE_SPEC

    assert parse_method(OFFICIAL_CODE_SPEC).change == "cosine"  # the official code's rule
    with pytest.raises(ValueError, match="change must be one of cosine, photometric"):
        parse_method("static:change=histogram")
    with pytest.raises(ValueError, match="unknown change rule 'x'"):
        patch_similarity(_as_tokens(*now), _as_tokens(*source), "x")


def test_the_photometric_perturbations_change_the_light_not_the_scene():
    from kvla.testbed.sim import PERTURBATIONS, perturbation

    frames = np.random.default_rng(0).integers(20, 220, (2, 32, 32, 3), dtype=np.uint8)  # two cameras
    flicker = perturbation("flicker")
    assert np.array_equal(flicker(frames, 0), frames)
    assert np.array_equal(flicker(frames, 1), np.round(frames * np.float32(0.8)).astype(np.uint8))
    ramp = perturbation("exposure_ramp")
    assert np.array_equal(ramp(frames, 0), frames) and np.array_equal(ramp(frames, 100), ramp(frames, 150))
    cast = perturbation("colour_shift")
    assert np.array_equal(cast(frames, 9), frames) and (cast(frames, 10)[..., 2] <= frames[..., 2]).all()
    shadow = perturbation("shadow")
    darker = [np.flatnonzero((shadow(frames, s) != frames).any(axis=(0, 1, 3))) for s in (5, 15)]
    assert darker[0].size and darker[1].size and darker[1].min() > darker[0].min()  # the band moves across
    for name, function in PERTURBATIONS.items():
        out = function(frames, 30)
        assert out.shape == frames.shape and out.dtype == np.uint8, name
    assert perturbation("none") is None
    with pytest.raises(ValueError, match="unknown perturbation 'fog'"):
        perturbation("fog")


def test_under_flicker_the_cosine_rule_reuses_and_the_photometric_rule_does_not():
    """On a static scene with flicker, static:change=cosine reuses every token of a dimmed frame
    (K/V computed under the other light); change=photometric recomputes them."""
    from kvla.model.vla import VLAModel
    from kvla.policy import CachedVLAPolicy
    from kvla.testbed.sim import flicker

    model = VLAModel.from_preset("tiny", seed=0)
    frame = np.random.default_rng(1).integers(30, 220, (1, 32, 32, 3), dtype=np.uint8)
    text = torch.randint(3, 100, (1, model.config.num_text_tokens))
    reuse = {}
    for rule in ("cosine", "photometric"):
        policy = CachedVLAPolicy(model, f"static:change={rule}")
        reuse[rule] = [policy.step(torch.from_numpy(flicker(frame, t)), text).reuse_ratio for t in range(4)]
    assert reuse["cosine"] == [0.0, 1.0, 1.0, 1.0]
    assert reuse["photometric"][1] == 0.0 and reuse["photometric"][2] == 0.0  # step 2 differs from source at 1
