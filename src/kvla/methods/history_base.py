"""What every history method shares: the context it edits the history cache in, and the interface.

A history method runs after each control step of a history VLA (`kvla.model.history`) and
decides what of the past stays in the KV cache for the next step: every frame, the last few, or
a learned selection of compressed chunks. It never touches the current step's computation, so
with nothing dropped the policy is exactly the model's own teacher-forced forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvla.engine.history import HistoryEngine, HistoryState
from kvla.model.history import HistoryLayout


@dataclass
class HistoryContext:
    state: HistoryState
    layout: HistoryLayout
    engine: HistoryEngine
    frame_embeddings: torch.Tensor  # [B, frame_len, hidden] decoder inputs of the frame just added
    cameras: int


class HistoryMethod:
    """Decides, after each step, which cache entries the next step sees. Subclasses are
    dataclasses whose fields are the method's settings; per-episode state lives in HistoryState."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "history"

    def prepare_model(self, model):
        """The model this method runs (a method with trained weights of its own may adapt a copy)."""
        return model

    def budget_entries(self, layout: HistoryLayout) -> int | None:
        """The most entries the cache may hold between two steps; None: no limit."""
        return None

    def after_step(self, ctx: HistoryContext) -> dict:  # pragma: no cover - interface
        """Edit ctx.state's cache; return notes for the step's output."""
        raise NotImplementedError


def keep_recent_frames(state: HistoryState, frames: int) -> None:
    """Keep the entries of the last `frames` frames seen (0: none)."""
    keep = state.entry_frame >= state.step - frames
    if not keep.all():
        state.keep(torch.nonzero(keep).flatten())
