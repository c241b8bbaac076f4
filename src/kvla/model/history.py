"""The history-conditioned reference VLA: past frames are context for the current step.

The same modules as the reference VLA (ViT, projector, proprio projector, Llama decoder, action
bins); only the sequence differs. One episode is one causal sequence:

    [frame 0: BOS, visual tokens, proprio | query 0: instruction, action placeholders] [frame 1 | query 1] ...

Frame t is the camera view at env step `frame_stride * t`; its query decodes the action chunk to
execute from there (the policy executes `frame_stride` actions of it, then sees the next frame).
A frame's tokens attend to every earlier frame's tokens and, causally, to their own block; a
step's query (the instruction and the placeholders) is seen by nobody else. So a block with no
history is exactly the single-frame reference VLA's prompt [BOS, visual, proprio, instruction,
placeholders] (RoPE sees only relative positions), and its weights are the starting point. So at
inference each frame is computed once and its K/V stays in the cache at its own position
(`kvla.engine.history`): exact for a causal model, positions running on through the episode.

Training reads whole demonstration episodes from their first frame (teacher forcing over
time). With `window`, each block sees only the last `window` frames before it: the same
sequence a `history_window` policy builds at inference (window 0: `no_history`), so the
baselines run on contexts the model was trained on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvla.engine.history import FRAME, HistoryEngine
from kvla.model.vla import BOS_TOKEN_ID, VLAConfig, VLAModel

HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class HistoryConfig:
    frame_stride: int = 4  # env steps between two frames; the actions of a chunk executed per call
    max_frames: int = 50  # frames of the longest training sequence (200 env steps at stride 4)

    def __post_init__(self):
        if self.frame_stride < 1 or self.max_frames < 1:
            raise ValueError(f"frame_stride and max_frames must be >= 1, got {self.frame_stride}, {self.max_frames}")


@dataclass(frozen=True)
class HistoryLayout:
    """Where each token of a history sequence sits."""

    num_text: int
    num_visual: int
    num_action_tokens: int

    @classmethod
    def of(cls, config: VLAConfig) -> "HistoryLayout":
        if not config.proprio_dim or not config.parallel_actions:
            raise ValueError("a history VLA needs a proprio token and parallel action placeholders")
        if config.mask_mode != "causal":
            raise ValueError(f"a history VLA attends causally across frames; mask_mode {config.mask_mode!r} "
                             "is not supported for it")
        return cls(config.num_text_tokens, config.num_visual, config.num_action_tokens)

    @property
    def frame_len(self) -> int:  # what a frame leaves in the history: BOS, visual tokens, proprio
        return 1 + self.num_visual + 1

    @property
    def query_len(self) -> int:  # what only the step itself reads: the instruction and the placeholders
        return self.num_text + self.num_action_tokens

    @property
    def block_len(self) -> int:  # a step's rows: the frame, then its query
        return self.frame_len + self.query_len

    def sequence_len(self, num_frames: int) -> int:
        return num_frames * self.block_len

    def block_positions(self, frame: int) -> torch.Tensor:
        start = frame * self.block_len
        return torch.arange(start, start + self.block_len)

    def sequence_mask(self, num_frames: int, window: int | None = None, device=None) -> torch.Tensor:
        """Boolean [L, L] (True: attend) of a whole sequence; `window` limits each block to the
        last `window` earlier frames (None: all of them)."""
        index = torch.arange(self.sequence_len(num_frames), device=device)
        block = index.div(self.block_len, rounding_mode="floor")
        query_row = index.remainder(self.block_len) >= self.frame_len
        query_block, key_block = block[:, None], block[None, :]
        earlier_frame = (~query_row[None, :]) & (key_block < query_block)
        if window is not None:
            earlier_frame &= key_block >= query_block - window
        allowed = (key_block == query_block) | earlier_frame
        return allowed & (index[None, :] <= index[:, None])


def frame_embeddings(model: VLAModel, policy_images: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
    """[B, 1 + V + 1, hidden]: BOS, a frame's visual tokens and its proprio token."""
    visual = model.encode_images(policy_images)
    if proprio is None or proprio.shape != (visual.shape[0], model.config.proprio_dim):
        raise ValueError(f"proprio must be [batch={visual.shape[0]}, {model.config.proprio_dim}], "
                         f"got {None if proprio is None else tuple(proprio.shape)}")
    token = model.proprio_projector(proprio.to(visual.device, visual.dtype))[:, None]
    embed = model.language_model.get_input_embeddings()
    bos = embed(torch.full((visual.shape[0], 1), BOS_TOKEN_ID, device=visual.device)).to(visual.dtype)
    return torch.cat([bos, visual, token], dim=1)


def query_embeddings(model: VLAModel, text_ids: torch.Tensor) -> torch.Tensor:
    """[B, T + A, hidden]: the instruction and the action placeholders (the last vocabulary entry,
    as the reference VLA)."""
    if text_ids.dim() != 2 or text_ids.shape[1] != model.config.num_text_tokens:
        raise ValueError(f"text_ids must be [batch, {model.config.num_text_tokens}], got {tuple(text_ids.shape)}")
    embed = model.language_model.get_input_embeddings()
    device = embed.weight.device
    placeholders = torch.full((text_ids.shape[0], model.config.num_action_tokens), model.config.vocab_size - 1,
                              device=device)
    return embed(torch.cat([text_ids.to(device), placeholders], dim=1))


def sequence_logits(model: VLAModel, engine: HistoryEngine, policy_images: torch.Tensor, proprio: torch.Tensor,
                    text_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Teacher-forced action logits [n, A, vocab] of one episode's n frames (policy_images
    uint8 [n, cameras, S, S, 3], proprio [n, P], text_ids [1, T]), all in one forward."""
    layout = HistoryLayout.of(model.config)
    frames = frame_embeddings(model, policy_images, proprio)  # [n, F, H]
    count = frames.shape[0]
    blocks = torch.cat([frames, query_embeddings(model, text_ids.expand(count, -1)).to(frames.dtype)], dim=1)
    embeds = blocks.reshape(1, -1, frames.shape[-1])
    length = layout.sequence_len(count)
    positions = torch.arange(length, device=embeds.device)[None]
    mask = layout.sequence_mask(count, window, device=embeds.device)[None, None]
    hidden = engine.forward(embeds, positions, mask, engine.new_cache())
    rows = hidden[0].reshape(count, layout.block_len, -1)[:, -layout.num_action_tokens:]
    return engine.logits(rows)


def block_kinds(layout: HistoryLayout, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry kinds and frame ids of a step's block (its query rows are cropped after the step)."""
    kinds = torch.full((layout.block_len,), FRAME, dtype=torch.long)
    return kinds, torch.full((layout.block_len,), frame, dtype=torch.long)


# ------------------------------------------------------------------ checkpoints
def save_history_config(directory, history: HistoryConfig) -> None:
    Path(directory, HISTORY_FILE).write_text(json.dumps(asdict(history), indent=2))


def is_history_checkpoint(directory) -> bool:
    return Path(directory, HISTORY_FILE).exists()


def load_history_config(directory) -> HistoryConfig:
    path = Path(directory, HISTORY_FILE)
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a history VLA checkpoint (no {HISTORY_FILE})")
    return HistoryConfig(**json.loads(path.read_text()))
