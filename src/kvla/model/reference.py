"""The reference VLA kvla trains itself: shaped like OpenVLA, small enough for a 2-core CPU.

[BOS, 64 visual tokens (128 px, 16 px patches), 1 proprio token, instruction tokens, action
tokens]; 256 bins per action dimension as the last 256 vocabulary entries; actions decoded
autoregressively (OpenVLA) or, with `parallel=True`, all action positions of an optional chunk in
one pass (OpenVLA-OFT). The instruction tokenizer is a word-level `tokenizers` model built from
the task set's instructions.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from kvla.model.vla import ACTION_BINS, BOS_TOKEN_ID, VLAConfig, VLAModel

SPECIAL_TOKENS = {"[PAD]": 0, "[BOS]": BOS_TOKEN_ID, "[EOS]": 2, "[UNK]": 3}
PAD_TOKEN_ID = 0

# ~5M parameters: ViT 4 x 192 and a Llama decoder 4 x 256; vocab and text length set from the tokenizer.
REFERENCE_CONFIG = VLAConfig(
    image_size=128, patch_size=16, vision_dim=192, vision_layers=4, vision_heads=3, vision_mlp=768,
    family="llama", hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4,
    vocab_size=0, num_text_tokens=0, action_dim=4, proprio_dim=4,
)


class InstructionTokenizer:
    """Word-level tokenizer over a fixed set of instructions, padded to a fixed length."""

    def __init__(self, tokenizer: Tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_instructions(cls, instructions: list[str]) -> "InstructionTokenizer":
        words = sorted({w for text in instructions for w in text.lower().split()})
        vocab = dict(SPECIAL_TOKENS)
        for word in words:
            vocab[word] = len(vocab)
        tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        max_length = max(len(tokenizer.encode(text.lower()).ids) for text in instructions)
        return cls(tokenizer, max_length)

    @property
    def text_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, instruction: str) -> list[int]:
        ids = self.tokenizer.encode(instruction.lower()).ids
        if len(ids) > self.max_length:
            raise ValueError(f"instruction {instruction!r} has {len(ids)} tokens; this tokenizer takes {self.max_length}")
        return ids + [PAD_TOKEN_ID] * (self.max_length - len(ids))

    def unknown_words(self, instruction: str) -> list[str]:
        """The words of `instruction` this tokenizer would map to [UNK]."""
        vocab = self.tokenizer.get_vocab()
        return [w for w, _ in self.tokenizer.pre_tokenizer.pre_tokenize_str(instruction.lower()) if w not in vocab]

    def encode_batch(self, instructions: list[str]) -> torch.Tensor:
        return torch.tensor([self.encode(text) for text in instructions], dtype=torch.long)

    def save(self, directory) -> None:
        directory = Path(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps({"max_length": self.max_length}))

    @classmethod
    def load(cls, directory) -> "InstructionTokenizer":
        directory = Path(directory)
        config = json.loads((directory / "tokenizer_config.json").read_text())
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")), config["max_length"])


def reference_config(tokenizer: InstructionTokenizer, parallel: bool = False, action_chunk: int = 1,
                     **overrides) -> VLAConfig:
    """The reference VLA's config for this tokenizer (action tokens after the text vocabulary)."""
    return replace(REFERENCE_CONFIG, vocab_size=tokenizer.text_vocab_size + ACTION_BINS,
                   num_text_tokens=tokenizer.max_length, parallel_actions=parallel, action_chunk=action_chunk,
                   **overrides)


def checkpoint_cameras(directory) -> tuple[str, ...]:
    """The simulator cameras a checkpoint's visual tokens come from, in order (sim.json; the
    first reference VLA predates it and saw corner2 only)."""
    from kvla.testbed.sim import CAMERA

    path = Path(directory) / "sim.json"
    if not path.exists():
        return (CAMERA,)
    return tuple(json.loads(path.read_text())["cameras"])


def load_policy_checkpoint(directory) -> tuple[VLAModel, InstructionTokenizer]:
    """A trained reference VLA and its tokenizer from a checkpoint directory."""
    return VLAModel.from_pretrained(directory), InstructionTokenizer.load(directory)
