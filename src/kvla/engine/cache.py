"""A position-ordered KV buffer that a partial prefill writes into at arbitrary positions.

Slot p of the buffer holds the key/value of prompt position p. One extra "discard" slot right
after the prompt absorbs the writes of padding rows (a batch whose samples recompute different
numbers of tokens is padded to the largest); it is always masked out. The action tokens decoded
after the prefill get the slots after that. Writing by slot index (gpt-fast's `update(input_pos)`
idea) means reused tokens keep last step's K/V in place and nothing is concatenated.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class PositionalKVLayer(DynamicLayer):
    """One decoder layer's KV buffer [batch, kv_heads, slots, head_dim], written by slot index."""

    def __init__(self, batch_size: int, num_kv_heads: int, num_slots: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (batch_size, num_kv_heads, num_slots, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.dtype, self.device = dtype, device
        self.is_initialized = True
        # Set by the engine before each call of this layer: [batch, rows] slot of each input row.
        self.write_slots: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, keys: torch.Tensor, values: torch.Tensor) -> "PositionalKVLayer":
        """A buffer holding these [batch, kv_heads, slots, head_dim] keys and values (not copied)."""
        layer = cls(0, keys.shape[1], keys.shape[2], keys.shape[3], keys.dtype, keys.device)
        layer.keys, layer.values = keys, values
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.write_slots is None:
            raise RuntimeError("PositionalKVLayer.update called without write_slots set by the engine")
        if key_states.dtype != self.keys.dtype or key_states.device != self.keys.device:
            raise TypeError(
                f"KV cache holds {self.keys.dtype} on {self.keys.device} but the model produced "
                f"{key_states.dtype} on {key_states.device}: reset the episode after moving the model"
            )
        index = self.write_slots[:, None, :, None].expand_as(key_states)
        self.keys.scatter_(2, index, key_states)
        self.values.scatter_(2, index, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2
