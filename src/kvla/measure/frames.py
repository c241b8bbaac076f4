"""The bundled camera frames: one recorded MetaWorld scripted-expert episode."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch


@dataclass
class Episode:
    frames: torch.Tensor  # uint8 [T, H, W, 3]
    instruction: str
    source: str


def load_frames(path: str | Path | None = None) -> Episode:
    """Load frames from an .npz with a uint8 `frames` array [T, H, W, 3]; default: the bundled episode."""
    if path is None:
        path = resources.files("kvla") / "fixtures" / "metaworld_frames.npz"
    path = Path(str(path))
    if not path.exists():
        raise FileNotFoundError(f"frames file {path} does not exist")
    with np.load(path) as data:
        if "frames" not in data:
            raise ValueError(f"{path} has no 'frames' array")
        frames = data["frames"]
        instruction = str(data["instruction"]) if "instruction" in data else ""
        task = str(data["task"]) if "task" in data else path.stem
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{path}: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    return Episode(frames=torch.from_numpy(frames), instruction=instruction, source=f"{path.name} ({task})")
