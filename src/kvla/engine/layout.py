"""Where each kind of token sits in a VLA prompt."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


class LayoutError(ValueError):
    """The token layout does not describe the sequence it is used with."""


Span = tuple[int, int]  # [start, end)


@dataclass(frozen=True)
class TokenLayout:
    """Positions of BOS, each camera's visual tokens, proprio, text and action tokens.

    `action_span` is set for parallel decoding (OpenVLA-OFT): the action positions are
    placeholders inside the prompt and are all decoded by the prefill pass. For autoregressive
    decoding (OpenVLA) it is None and `num_action_tokens` tokens are generated after the prompt.
    Only visual tokens may ever be reused; everything else is recomputed at every step.

    `blocks` declares the prompt's attention mask: a non-decreasing block id per prompt position.
    A token sees every token of its own block and every earlier token (None: causal, each token its
    own block). `prefix_lm` and `bidirectional` build the two common cases; decoded tokens are
    always causal. Under a block mask a token's K/V depends on later tokens of its block, so
    reusing it is exact only when its whole block is unchanged. `position_offset` shifts every RoPE
    position (sequence index + offset) for models that do not count from 0.
    """

    seq_len: int
    visual_spans: tuple[Span, ...]
    text_span: Span
    bos_position: int | None = 0
    proprio_span: Span | None = None
    action_span: Span | None = None
    num_action_tokens: int = 7
    blocks: tuple[int, ...] | None = None
    position_offset: int = 0  # RoPE position of sequence index 0 (PaliGemma counts from 1)
    # multimodal RoPE (Qwen2-VL): each prompt slot's 3 position components (temporal, height, width),
    # and the position of the first decoded token (the same in all three components)
    rope_positions: tuple[tuple[int, ...], ...] | None = None
    next_rope_position: int | None = None
    _visual_index: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        spans = [("visual", s) for s in self.visual_spans] + [("text", self.text_span)]
        if self.proprio_span is not None:
            spans.append(("proprio", self.proprio_span))
        if self.action_span is not None:
            spans.append(("action", self.action_span))
        if self.bos_position is not None:
            spans.append(("bos", (self.bos_position, self.bos_position + 1)))
        if not self.visual_spans:
            raise LayoutError("layout has no visual tokens")
        covered = torch.zeros(self.seq_len, dtype=torch.int32)
        for name, (start, end) in spans:
            if not 0 <= start < end <= self.seq_len:
                raise LayoutError(f"{name} span [{start}, {end}) is empty or outside a sequence of {self.seq_len}")
            covered[start:end] += 1
        if (covered > 1).any():
            raise LayoutError(f"layout spans overlap at positions {torch.nonzero(covered > 1).flatten().tolist()[:8]}")
        if self.action_span is not None and self.action_span[1] != self.seq_len:
            raise LayoutError("parallel action placeholders must end the prompt")
        if self.action_span is None and self.num_action_tokens < 1:
            raise LayoutError("autoregressive decoding needs num_action_tokens >= 1")
        index = torch.cat([torch.arange(s, e) for s, e in self.visual_spans])
        object.__setattr__(self, "_visual_index", index)
        if self.blocks is not None:
            blocks = tuple(int(b) for b in self.blocks)
            if len(blocks) != self.seq_len:
                raise LayoutError(f"blocks has {len(blocks)} entries for a prompt of {self.seq_len} tokens")
            if any(later < earlier for earlier, later in zip(blocks, blocks[1:])):
                raise LayoutError("blocks must be non-decreasing: a block is a contiguous run of the prompt")
            object.__setattr__(self, "blocks", blocks)
        if self.rope_positions is not None:
            table = tuple(tuple(int(p) for p in row) for row in self.rope_positions)
            if len(table) != 3 or any(len(row) != self.seq_len for row in table):
                raise LayoutError(f"rope_positions must be 3 rows of {self.seq_len} positions (temporal, height, width)")
            if self.next_rope_position is None or self.next_rope_position <= max(max(row) for row in table):
                raise LayoutError("next_rope_position must follow every prompt position")
            object.__setattr__(self, "rope_positions", table)
            object.__setattr__(self, "_rope_table", torch.tensor(table))

    def rope_position_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """RoPE position ids of the prompt rows `rows` ([B, n] sequence indices): [B, n], or
        [3, B, n] under multimodal RoPE."""
        if self.rope_positions is None:
            return rows + self.position_offset
        return self._rope_table.to(rows.device)[:, rows]

    def decode_rope_position_ids(self, index: int, batch: int, device) -> torch.Tensor:
        """RoPE position ids of the `index`-th decoded token (0: the first after the prompt)."""
        if self.rope_positions is None:
            return torch.full((batch, 1), self.seq_len + index + self.position_offset, dtype=torch.long, device=device)
        return torch.full((3, batch, 1), self.next_rope_position + index, dtype=torch.long, device=device)

    @property
    def mask_mode(self) -> str:
        """causal, bidirectional (one block), prefix_lm (one block, then causal) or blocks."""
        if self.blocks is None or len(set(self.blocks)) == self.seq_len:
            return "causal"
        if len(set(self.blocks)) == 1:
            return "bidirectional"
        first = self.blocks.count(self.blocks[0])
        if len(set(self.blocks[first:])) == self.seq_len - first:
            return "prefix_lm"
        return "blocks"

    def with_blocks(self, blocks) -> "TokenLayout":
        return dataclasses.replace(self, blocks=tuple(blocks))

    def with_mask_mode(self, mode: str, prefix_end: int | None = None) -> "TokenLayout":
        """This layout under a named mask: causal; bidirectional (the whole prompt one block, as
        OpenVLA-OFT); prefix_lm (positions before `prefix_end` one block, the rest causal, as
        PaliGemma; default: everything before the action placeholders)."""
        if mode == "causal":
            return dataclasses.replace(self, blocks=None)
        if mode == "bidirectional":
            return self.with_blocks([0] * self.seq_len)
        if mode == "prefix_lm":
            end = prefix_end if prefix_end is not None else (self.action_span[0] if self.parallel else self.seq_len)
            if not 1 <= end <= self.seq_len:
                raise LayoutError(f"prefix_end {end} is outside a prompt of {self.seq_len} tokens")
            return self.with_blocks([0] * end + list(range(1, self.seq_len - end + 1)))
        raise LayoutError(f"unknown mask mode {mode!r}: causal, prefix_lm or bidirectional")

    def attention_allowed(self, total_len: int | None = None, window: int | None = None, device=None) -> torch.Tensor:
        """Bool [total, total] of which key each query of the prompt followed by decoded tokens may
        attend (the training forward's mask; the engine builds its per-row masks itself)."""
        total = total_len or self.seq_len
        index = torch.arange(total, device=device)
        allowed = index[None, :] <= index[:, None]
        if window is not None:
            allowed &= index[None, :] > index[:, None] - window
        blocks = torch.cat([self.block_ids(device), self.seq_len + index[self.seq_len:]])  # decoded: causal
        return allowed | (blocks[None, :] == blocks[:, None])

    def block_ids(self, device=None) -> torch.Tensor:
        """Block id per prompt position [seq_len] (causal: the position itself)."""
        if self.blocks is None:
            return torch.arange(self.seq_len, device=device)
        return torch.tensor(self.blocks, device=device)

    @classmethod
    def single_prompt(cls, num_visual: int, num_text: int, *, num_cameras: int = 1,
                      num_proprio: int = 0, num_action_tokens: int = 7,
                      parallel_actions: bool = False, mask_mode: str = "causal") -> "TokenLayout":
        """[BOS, camera 1 visual, ..., camera C visual, proprio, text, (action placeholders)]."""
        position = 1
        visual = []
        for _ in range(num_cameras):
            visual.append((position, position + num_visual))
            position += num_visual
        proprio = None
        if num_proprio:
            proprio = (position, position + num_proprio)
            position += num_proprio
        text = (position, position + num_text)
        position += num_text
        action = None
        if parallel_actions:
            action = (position, position + num_action_tokens)
            position += num_action_tokens
        layout = cls(seq_len=position, visual_spans=tuple(visual), text_span=text, bos_position=0,
                     proprio_span=proprio, action_span=action, num_action_tokens=num_action_tokens)
        return layout.with_mask_mode(mask_mode)

    @property
    def parallel(self) -> bool:
        return self.action_span is not None

    @property
    def visual_positions(self) -> torch.Tensor:
        """Sequence positions of all visual tokens, cameras in order, patches in raster order."""
        return self._visual_index

    @property
    def num_visual(self) -> int:
        return int(self._visual_index.numel())

    @property
    def output_positions(self) -> torch.Tensor:
        """Positions whose logits the prefill must return."""
        if self.action_span is not None:
            return torch.arange(*self.action_span)
        return torch.tensor([self.seq_len - 1])

    def check_sequence(self, seq_len: int) -> None:
        if seq_len != self.seq_len:
            raise LayoutError(f"layout describes {self.seq_len} tokens but the sequence has {seq_len}")
