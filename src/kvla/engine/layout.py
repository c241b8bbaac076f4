"""Where each kind of token sits in a VLA prompt."""

from __future__ import annotations

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
    """

    seq_len: int
    visual_spans: tuple[Span, ...]
    text_span: Span
    bos_position: int | None = 0
    proprio_span: Span | None = None
    action_span: Span | None = None
    num_action_tokens: int = 7
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

    @classmethod
    def single_prompt(cls, num_visual: int, num_text: int, *, num_cameras: int = 1,
                      num_proprio: int = 0, num_action_tokens: int = 7,
                      parallel_actions: bool = False) -> "TokenLayout":
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
        return cls(seq_len=position, visual_spans=tuple(visual), text_span=text, bos_position=0,
                   proprio_span=proprio, action_span=action, num_action_tokens=num_action_tokens)

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
