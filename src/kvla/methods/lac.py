"""`lac`: learned token caching (LAC, arXiv 2602.00686, "Learning to Accelerate Vision-Language-
Action Models through Adaptive Visual Token Caching").

Two small learned modules decide reuse instead of hand-set thresholds:

- Cached Token Selector: a small CNN on the current RGB frame concatenated with a motion input
  between adjacent policy calls gives each visual token (patch of each camera) a saliency
  s_i in [0, 1]; high means recompute, low means reuse. It does not see the instruction. The
  paper's motion input is RAFT-small optical flow, whose weights cannot be downloaded here:
  kvla uses OpenCV's Farneback flow (`motion="flow"`) or the signed frame difference
  (`motion="difference"`), chosen when the modules are trained.
- Cache Ratio Predictor: an MLP on the selector's pooled features gives logits over a discrete
  set of cache ratios R = {r_j} (default 0, 0.1, ..., 0.9). At inference r = R[argmax], and the
  k = round(N * r) lowest-saliency visual tokens (N: all visual tokens) whose cached K/V is
  complete and younger than `max_age` steps are reused in every decoder layer at their original
  positions.
- Change veto (`change="photometric"`, kvla's addition): the selector sees RGB and motion and was
  trained on plain frames, so it may rank a patch whose light changed (flicker, exposure, shadow)
  as reusable; with the veto a token is a candidate only if its patch's channel means and
  contrasts stayed within `levels` grey levels of the frame its K/V came from. This is the
  default; `change=learned` (the paper's) leaves the choice to the selector alone.
- Stochastic recovery: each token chosen for reuse is recomputed instead with probability p
  (`recovery`), from a generator seeded per episode (`seed`), so runs are reproducible.

Training (kvla.testbed.train_lac, `kvla train lac`), with the VLA frozen:
  Stage I:  min MSE(s, A), A the frozen VLA's attention to each visual token: the attention the
            instruction tokens pay it, mean over heads, instruction rows and all decoder layers,
            min-max scaled per frame to [0, 1].
  Stage II: min L_VLA + lambda * L_ratio,   L_ratio = -sum_j p_j r_j,   p = softmax(logits),
            where L_VLA is the action loss through reuse: in every layer each visual token's K/V
            is m_i * fresh + (1 - m_i) * cached (the previous policy call's frame),
            m_i = sigmoid((s_i - theta_k) / tau_s), theta_k between the k-th and (k+1)-th lowest
            saliency, hard top-k in the forward pass (straight-through), and the ratio one-hot
            y = GumbelSoftmax(logits) with straight-through: m = sum_j y_j m^(j).
  Where kvla differs from the paper's description, and why (measured in BENCHMARKS.md):
  - L_VLA's target: by default the frozen VLA's own full-forward action distribution (a
    distillation cross-entropy), `--target demo` for the paper's demonstrated actions. On held-out
    pairs the distilled selector keeps more agreement with `full` and even a lower loss on the
    demonstrations: the demonstration labels mostly add noise to the reuse signal.
  - theta_k is not detached, and tokens rank by the saliency logit: a detached threshold lets every
    saliency drift up into float32 sigmoid ties, which then rank by token order.
  - Stage II starts with `explore_steps` steps at uniformly drawn ratios (the selector alone),
    so the predictor does not settle on "no reuse" before the selector can rank.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kvla.engine.plan import ReusePlan
from kvla.methods.base import PlanContext, ReuseMethod, register

DEFAULT_RATIOS = tuple(round(0.1 * j, 1) for j in range(10))
MOTIONS = ("flow", "difference")
LAC_CHANGE_RULES = ("learned", "photometric")
MODULES_CONFIG = "lac_config.json"
MODULES_WEIGHTS = "lac_modules.safetensors"


@dataclass(frozen=True)
class LACModulesConfig:
    """The shape of the two modules; saved with their weights."""

    num_cameras: int
    image_size: int  # the policy's input image side
    patch_size: int  # one visual token per patch
    motion: str = "flow"  # "flow" (Farneback) or "difference" (signed RGB difference)
    input_size: int = 64  # the selector and the flow run at this side (cheap; patches stay whole cells)
    width: int = 16  # channels of the selector's first convolution
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    flow_pixel_scale: float = 2.0  # flow (pixels at input_size) divided by this before the CNN

    def __post_init__(self):
        if self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {', '.join(MOTIONS)}, got {self.motion!r}")
        grid = self.image_size // self.patch_size
        if self.image_size % self.patch_size or self.input_size % grid:
            raise ValueError(f"input_size {self.input_size} must be a multiple of the {grid}x{grid} token grid")
        cell = self.input_size // grid
        if cell & (cell - 1) or cell < 2:
            raise ValueError(f"input_size / grid = {cell} must be a power of two >= 2 (the CNN halves it)")
        if not self.ratios or any(not 0.0 <= r < 1.0 for r in self.ratios):
            raise ValueError(f"cache ratios must lie in [0, 1), got {self.ratios}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def motion_channels(self) -> int:
        return 2 if self.motion == "flow" else 3


def motion_input(current: np.ndarray, previous: np.ndarray, config: LACModulesConfig) -> np.ndarray:
    """RGB + motion for one camera image pair (uint8 [S, S, 3]) -> float32 [3 + motion, s, s]."""
    import cv2

    size = config.input_size
    cur = cv2.resize(current, (size, size), interpolation=cv2.INTER_AREA)
    prev = cv2.resize(previous, (size, size), interpolation=cv2.INTER_AREA)
    rgb = cur.astype(np.float32) / 127.5 - 1.0
    if config.motion == "flow":
        cv2.setNumThreads(1)  # a 64 px flow gains nothing from threads; the policy's workers own the cores
        flow = cv2.calcOpticalFlowFarneback(cv2.cvtColor(prev, cv2.COLOR_RGB2GRAY), cv2.cvtColor(cur, cv2.COLOR_RGB2GRAY),
                                            None, 0.5, 2, 9, 2, 5, 1.1, 0)
        motion = flow / config.flow_pixel_scale
    else:
        motion = (cur.astype(np.float32) - prev.astype(np.float32)) / 127.5
    return np.concatenate([rgb, motion], axis=-1).transpose(2, 0, 1)


def selector_inputs(current: torch.Tensor, previous: torch.Tensor, config: LACModulesConfig) -> torch.Tensor:
    """uint8 images [B, cameras, S, S, 3] of this call and the previous -> [B * cameras, C, s, s]."""
    if current.shape != previous.shape or current.dim() != 5:
        raise ValueError(f"current and previous images must both be [B, cameras, S, S, 3], got "
                         f"{tuple(current.shape)} and {tuple(previous.shape)}")
    cur, prev = current.cpu().numpy(), previous.cpu().numpy()
    stacked = [motion_input(cur[b, c], prev[b, c], config) for b in range(cur.shape[0]) for c in range(cur.shape[1])]
    return torch.from_numpy(np.stack(stacked))


class CachedTokenSelector(nn.Module):
    """Strided CNN: [N, 3 + motion, s, s] -> saliency logits [N, grid * grid] and pooled features.

    Saliency is sigmoid(logit); tokens are ranked by the logit, which never ties where the
    sigmoid saturates in float32 (ties would fall back to token order)."""

    def __init__(self, config: LACModulesConfig):
        super().__init__()
        downsamplings = (config.input_size // config.grid).bit_length() - 1
        channels = [3 + config.motion_channels] + [config.width * 2 ** i for i in range(downsamplings)]
        self.body = nn.Sequential(*[
            layer for i in range(downsamplings)
            for layer in (nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1), nn.GELU())
        ])
        self.context = nn.Sequential(nn.Conv2d(channels[-1], channels[-1], 3, padding=1), nn.GELU())
        self.head = nn.Conv2d(channels[-1], 1, 1)
        self.feature_dim = channels[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.context(self.body(x))
        return self.head(features).flatten(1), features.mean(dim=(2, 3))


class CacheRatioPredictor(nn.Module):
    """MLP on every camera's pooled selector features and mean saliency -> logits over the ratios."""

    def __init__(self, config: LACModulesConfig, feature_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(config.num_cameras * (feature_dim + 1), hidden), nn.GELU(),
                                 nn.Linear(hidden, len(config.ratios)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class LACModules(nn.Module):
    """The selector and the predictor together: one frame pair -> per-token saliency and ratio logits."""

    def __init__(self, config: LACModulesConfig):
        super().__init__()
        self.config = config
        self.selector = CachedTokenSelector(config)
        self.predictor = CacheRatioPredictor(config, self.selector.feature_dim)
        self.register_buffer("ratios", torch.tensor(config.ratios, dtype=torch.float32), persistent=False)

    def forward(self, inputs: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [B * cameras, C, s, s] (selector_inputs) -> saliency logits [B, V], ratio logits [B, R]."""
        scores, pooled = self.selector(inputs)
        saliency = torch.sigmoid(scores)
        features = torch.cat([pooled, saliency.mean(1, keepdim=True)], 1)
        # camera-major: the visual-token order
        return scores.reshape(batch, -1), self.predictor(features.reshape(batch, -1))

    def save(self, directory) -> None:
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / MODULES_WEIGHTS))
        (directory / MODULES_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, directory) -> "LACModules":
        from safetensors.torch import load_model

        directory = Path(directory)
        for name in (MODULES_CONFIG, MODULES_WEIGHTS):
            if not (directory / name).exists():
                raise FileNotFoundError(f"{directory} holds no trained LAC modules (no {name}); train them with "
                                        f"`kvla train lac` or point lac's `modules` setting at their directory")
        settings = json.loads((directory / MODULES_CONFIG).read_text())
        settings["ratios"] = tuple(settings["ratios"])
        modules = cls(LACModulesConfig(**settings))
        load_model(modules, str(directory / MODULES_WEIGHTS))
        return modules.eval()


def patches_to_images(patches: torch.Tensor, num_cameras: int) -> torch.Tensor:
    """PlanContext.patches [B, V, 3 p p] -> uint8 images [B, cameras, S, S, 3] (VLAModel.image_patches inverted)."""
    batch, tokens, patch_dim = patches.shape
    patch = int(round((patch_dim / 3) ** 0.5))
    grid = int(round((tokens / num_cameras) ** 0.5))
    if 3 * patch * patch != patch_dim or num_cameras * grid * grid != tokens:
        raise ValueError(f"patches of shape {tuple(patches.shape)} are not {num_cameras} square grid(s) of RGB patches")
    x = patches.reshape(batch, num_cameras, grid, grid, patch, patch, 3).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(batch, num_cameras, grid * patch, grid * patch, 3).round().clamp(0, 255).to(torch.uint8)


_LOADED: dict[str, LACModules] = {}


def load_modules(directory: str) -> LACModules:
    """Trained modules, loaded once per process."""
    key = str(Path(directory).resolve())
    if key not in _LOADED:
        _LOADED[key] = LACModules.load(directory)
    return _LOADED[key]


@register
@dataclass
class LearnedCaching(ReuseMethod):
    name = "lac"
    modules: str = "checkpoints/lac-v2"  # directory of trained modules (`kvla train lac`), for this VLA
    recovery: float = 0.05  # p: probability that a token chosen for reuse is recomputed anyway
    seed: int = 0  # of the recovery draws; the generator restarts with every episode
    max_age: int = 2  # reuse only K/V computed fewer than this many calls ago (2: from the previous call)
    fixed_ratio: float | None = None  # ablation: reuse this fraction instead of the predictor's choice
    change: str = "photometric"  # photometric (also veto light changes), or learned (the selector alone, the paper's)
    levels: float = 2.0  # photometric: largest change of a channel's patch mean or std, in grey levels

    def __post_init__(self):
        if not 0.0 <= self.recovery <= 1.0:
            raise ValueError(f"lac recovery must be a probability in [0, 1], got {self.recovery}")
        if self.fixed_ratio is not None and not 0.0 <= self.fixed_ratio <= 1.0:
            raise ValueError(f"lac fixed_ratio must lie in [0, 1], got {self.fixed_ratio}")
        if self.max_age < 0:
            raise ValueError(f"lac max_age must be >= 0 (0: no limit), got {self.max_age}")
        if self.change not in LAC_CHANGE_RULES:
            raise ValueError(f"lac change must be one of {', '.join(LAC_CHANGE_RULES)}, got {self.change!r}")
        if self.levels < 0:
            raise ValueError(f"lac levels must be >= 0 grey levels, got {self.levels}")

    def _modules_for(self, ctx: PlanContext) -> LACModules:
        modules = load_modules(self.modules)
        cfg, layout = modules.config, ctx.layout
        tokens = cfg.num_cameras * cfg.grid ** 2
        if tokens != layout.num_visual or 3 * cfg.patch_size ** 2 != ctx.patches.shape[-1]:
            raise ValueError(f"the LAC modules in {self.modules} were trained for {cfg.num_cameras} camera(s) of "
                             f"{cfg.grid}x{cfg.grid} patches of {cfg.patch_size} px; this model has "
                             f"{layout.num_visual} visual tokens of patch dimension {ctx.patches.shape[-1]}")
        return modules

    @torch.no_grad()
    def decide(self, ctx: PlanContext, images: torch.Tensor, previous: torch.Tensor,
               modules: LACModules | None = None):
        """Saliency logits [B, V] (saliency = their sigmoid) and the cache ratio [B] of this call."""
        modules = modules if modules is not None else self._modules_for(ctx)
        scores, logits = modules(selector_inputs(images, previous, modules.config), images.shape[0])
        if self.fixed_ratio is not None:
            ratio = torch.full((images.shape[0],), float(self.fixed_ratio))
        else:
            ratio = modules.ratios[logits.argmax(-1)]
        return scores, ratio

    def plan(self, ctx: PlanContext) -> ReusePlan:
        memory = ctx.state.method_memory.setdefault(self.name, {})
        modules = self._modules_for(ctx)  # looked up and checked once per call
        images = patches_to_images(ctx.patches.cpu(), modules.config.num_cameras)
        previous, memory["previous_images"] = memory.get("previous_images"), images
        if not ctx.state.has_cache or previous is None or previous.shape != images.shape:
            return ctx.full_plan()
        scores, ratio = self.decide(ctx, images, previous, modules)
        candidates = ctx.reusable_candidates(self.max_age).cpu()
        if self.change == "photometric":
            candidates &= ctx.photometric_unchanged(self.levels).cpu()
        # rank of each token among the candidates by saliency, lowest first; k_b = round(N * r_b)
        rank = scores.masked_fill(~candidates, float("inf")).argsort(dim=1, stable=True).argsort(1)
        wanted = (ratio * ctx.layout.num_visual).round().long()
        reuse = (rank < wanted[:, None]) & candidates
        if self.recovery > 0:
            generator = memory.setdefault("generator", torch.Generator().manual_seed(self.seed))
            reuse &= torch.rand(reuse.shape, generator=generator) >= self.recovery
        depth = torch.where(reuse, 0, ctx.num_layers).long()
        return ReusePlan(visual_depth=depth, notes={"ratio": ratio.mean().item(),
                                                    "reused": reuse.sum(1).float().mean().item()})
