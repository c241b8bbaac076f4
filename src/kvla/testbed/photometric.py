"""Photometric perturbations of camera frames: what real robots meet and rendered demos lack.

Each is a function (uint8 frames [..., H, W, 3], env step) -> uint8 frames of the same shape,
deterministic in the step, applied to every camera. The scene does not change; only the light
does, so a change detector that reuses across them keeps K/V computed under other light.
"""

from __future__ import annotations

import numpy as np


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
