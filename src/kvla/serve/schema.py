"""The observation a robot sends `kvla serve`, checked field by field: what it may hold is
published in the metadata sent on connect, and anything else is refused with an error that names
the field and what was expected, before any of it reaches the policy or the episode's cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvla.model.inputs import InputError, check_step_inputs


@dataclass
class Observation:
    images: torch.Tensor  # uint8 [1, cameras, H, W, 3]
    text_ids: torch.Tensor  # long [1, num_text_tokens]
    proprio: torch.Tensor | None  # float32 [1, proprio_dim]
    reset: bool  # start a new episode before this step


@dataclass(frozen=True)
class ObservationSchema:
    config: object  # the model's VLAConfig
    cameras: tuple[str, ...]
    tokenizer: object | None = None  # InstructionTokenizer: "prompt" is accepted only with one
    max_image_side: int = 1024
    max_prompt_chars: int = 512

    @property
    def fields(self) -> tuple[str, ...]:
        return ("images", "prompt", "text_ids", "proprio", "reset")

    def describe(self) -> dict:
        """The observation format, for the metadata sent on connect."""
        config = self.config
        described = {
            "images": {"cameras": list(self.cameras), "dtype": "uint8", "shape": "[H, W, 3] RGB, every camera the same size",
                       "max_side": self.max_image_side, "model_resolution": config.image_size},
            "text_ids": {"dtype": "integer", "shape": [config.num_text_tokens],
                         "range": f"[0, {config.vocab_size})"},
            "proprio": ({"dtype": "float", "shape": [config.proprio_dim], "finite": True} if config.proprio_dim
                        else None),
            "reset": {"dtype": "bool", "meaning": "start a new episode with this observation (a new connection "
                                                  "always starts one)"},
            "required": ["images", "prompt or text_ids"] + (["proprio"] if config.proprio_dim else []),
        }
        if self.tokenizer is not None:
            described["prompt"] = {"dtype": "str", "max_chars": self.max_prompt_chars,
                                   "max_tokens": self.tokenizer.max_length, "vocabulary": "word level, lower case"}
        return described

    def parse(self, observation) -> Observation:
        if not isinstance(observation, dict):
            raise InputError("observation", f"must be a map of {', '.join(self.fields)}, got {type(observation).__name__}")
        unknown = sorted(str(key) for key in observation if key not in self.fields)
        if unknown:
            raise InputError(unknown[0], f"unknown field; an observation holds {', '.join(self.fields)}")
        images = self._images(observation.get("images"))
        text_ids = self._text_ids(observation)
        proprio = self._proprio(observation.get("proprio"))
        reset = observation.get("reset", False)
        if not isinstance(reset, (bool, np.bool_)):
            raise InputError("reset", f"must be a bool, got {type(reset).__name__}")
        check_step_inputs(self.config, images, text_ids, proprio)  # the policy's own checks, on what it will get
        return Observation(images, text_ids, proprio, bool(reset))

    def _images(self, images) -> torch.Tensor:
        if not isinstance(images, dict):
            raise InputError("images", f"must be a map of camera name to a uint8 [H, W, 3] array for the cameras "
                                       f"{list(self.cameras)}, got {type(images).__name__}")
        missing = [c for c in self.cameras if c not in images]
        extra = sorted(str(c) for c in images if c not in self.cameras)
        if missing or extra:
            raise InputError("images", f"needs exactly the cameras {list(self.cameras)}; "
                                       f"missing {missing}, unknown {extra}")
        frames = []
        for camera in self.cameras:
            frame, field = images[camera], f"images.{camera}"
            if not isinstance(frame, np.ndarray):
                raise InputError(field, f"must be a uint8 [H, W, 3] array, got {type(frame).__name__}")
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
                hint = " (looks like channels first: send [H, W, 3])" if frame.ndim == 3 and frame.shape[0] == 3 else ""
                raise InputError(field, f"must be a uint8 [H, W, 3] array, got {frame.dtype} {list(frame.shape)}{hint}")
            if not (1 <= frame.shape[0] <= self.max_image_side and 1 <= frame.shape[1] <= self.max_image_side):
                raise InputError(field, f"{frame.shape[0]}x{frame.shape[1]} is outside 1..{self.max_image_side} per side")
            if frames and frame.shape != frames[0].shape:
                raise InputError(field, f"is {list(frame.shape)} but {self.cameras[0]} is {list(frames[0].shape)}; "
                                        "every camera must be the same size")
            frames.append(frame)
        return torch.from_numpy(np.stack(frames))[None]

    def _text_ids(self, observation: dict) -> torch.Tensor:
        has_prompt, has_ids = "prompt" in observation, "text_ids" in observation
        if has_prompt == has_ids:
            raise InputError("prompt", "send exactly one of prompt (text) and text_ids (token ids)")
        if has_ids:
            ids = observation["text_ids"]
            if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu" or ids.ndim != 1:
                got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, np.ndarray) else type(ids).__name__
                raise InputError("text_ids", f"must be an integer array [{self.config.num_text_tokens}], got {got}")
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
                raise InputError("text_ids", f"ids must be in [0, {self.config.vocab_size})")
            return torch.from_numpy(ids.astype(np.int64))[None]
        prompt = observation["prompt"]
        if self.tokenizer is None:
            raise InputError("prompt", "this checkpoint has no tokenizer: send text_ids")
        if not isinstance(prompt, str):
            raise InputError("prompt", f"must be a string, got {type(prompt).__name__}")
        if len(prompt) > self.max_prompt_chars:
            raise InputError("prompt", f"{len(prompt)} characters exceeds the limit of {self.max_prompt_chars}")
        unknown = self.tokenizer.unknown_words(prompt)
        if unknown:
            raise InputError("prompt", f"words outside the model's vocabulary: {unknown[:5]}")
        try:
            return torch.tensor([self.tokenizer.encode(prompt)], dtype=torch.long)
        except ValueError as error:
            raise InputError("prompt", str(error)) from None

    def _proprio(self, proprio) -> torch.Tensor | None:
        if proprio is None:
            return None
        if not isinstance(proprio, np.ndarray) or proprio.dtype.kind not in "fiu" or proprio.ndim != 1:
            got = f"{proprio.dtype} {list(proprio.shape)}" if isinstance(proprio, np.ndarray) else type(proprio).__name__
            raise InputError("proprio", f"must be a float array [{self.config.proprio_dim}], got {got}")
        return torch.from_numpy(proprio.astype(np.float32))[None]
