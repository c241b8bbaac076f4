"""The checks every control step's inputs pass before anything is computed from them, shared by
the in-process policies and the policy server: a clear error naming the field, instead of a
torch-internal error or actions computed from garbage."""

from __future__ import annotations

import torch


class InputError(ValueError):
    """An input the model cannot take; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ImageError(InputError):
    """Camera frames the model cannot take."""

    def __init__(self, message: str):
        super().__init__("images", message)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def check_images(images, num_cameras: int) -> int:
    """uint8 camera frames [B, H, W, 3] or [B, cameras, H, W, 3]; returns B."""
    if not isinstance(images, torch.Tensor):
        raise ImageError(f"camera frames must be a torch.Tensor, got {_describe(images)}")
    if images.dtype != torch.uint8:
        raise ImageError(f"camera frames must be uint8 RGB, got {images.dtype}")
    if images.dim() not in (4, 5) or images.shape[-1] != 3:
        raise ImageError(f"camera frames must be [B, H, W, 3] or [B, cameras, H, W, 3], "
                                   f"got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ImageError("the batch is empty (B = 0)")
    cameras = 1 if images.dim() == 4 else images.shape[1]
    if cameras != num_cameras:
        raise ImageError(f"model expects {num_cameras} camera(s), got {cameras}")
    if images.shape[-3] == 0 or images.shape[-2] == 0:
        raise ImageError(f"zero-sized image {images.shape[-3]}x{images.shape[-2]}")
    return images.shape[0]


def check_text_ids(text_ids, batch: int, num_text_tokens: int, vocab_size: int) -> None:
    if not isinstance(text_ids, torch.Tensor):
        raise InputError("text_ids", f"must be a torch.Tensor of token ids, got {_describe(text_ids)}")
    if text_ids.dtype not in (torch.int64, torch.int32):  # what an embedding takes
        raise InputError("text_ids", f"token ids must be an integer tensor (int64 or int32), got {text_ids.dtype}")
    if text_ids.shape != (batch, num_text_tokens):
        raise InputError("text_ids", f"text_ids must be [batch={batch}, {num_text_tokens}], got {tuple(text_ids.shape)}")
    low, high = int(text_ids.min()), int(text_ids.max())
    if low < 0 or high >= vocab_size:
        raise InputError("text_ids", f"id {low if low < 0 else high} is outside the vocabulary [0, {vocab_size})")


def check_proprio(proprio, batch: int, proprio_dim: int) -> None:
    if proprio_dim == 0:
        if proprio is not None:
            raise InputError("proprio", f"this model takes no proprio, got {_describe(proprio)}")
        return
    if proprio is None:
        raise InputError("proprio", f"this model needs proprio [batch={batch}, {proprio_dim}], got none")
    if not isinstance(proprio, torch.Tensor):
        raise InputError("proprio", f"must be a torch.Tensor, got {_describe(proprio)}")
    if not proprio.is_floating_point():
        raise InputError("proprio", f"must be a floating-point tensor, got {proprio.dtype}")
    if proprio.shape != (batch, proprio_dim):
        raise InputError("proprio", f"must be [batch={batch}, {proprio_dim}], got {tuple(proprio.shape)}")
    finite = torch.isfinite(proprio)
    if not bool(finite.all()):
        row, column = (~finite).nonzero()[0].tolist()
        raise InputError("proprio", f"holds {proprio[row, column].item()} at [{row}, {column}]; values must be finite")


def check_step_inputs(config, images, text_ids, proprio) -> None:
    """Every input of one control step, against a VLAConfig."""
    batch = check_images(images, config.num_cameras)
    check_text_ids(text_ids, batch, config.num_text_tokens, config.vocab_size)
    check_proprio(proprio, batch, config.proprio_dim)
