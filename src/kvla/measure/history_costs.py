"""What a history costs a step, as the episode goes on: KV bytes, attention FLOPs and step latency
of each history method over the same frames, interleaved step by step (`kvla bench history`).

The frames are one scripted-expert episode of a task, recorded for a fixed number of env steps
(the expert keeps acting after success, so every method sees the same long episode); every method
steps through them with its own state, in an order rotated at every step, and the episode is run
`repeats` times. Latency per step is the median over the repeats; the speed-up at a step is the
median over repeats of the paired ratio history_full / method.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from kvla.measure.flops import history_attention_flops, history_step_flops


@dataclass
class HistoryCostCurve:
    method: str
    env_steps: list[int] = field(default_factory=list)  # the env step of each call
    step_ms: list[float] = field(default_factory=list)  # median over repeats
    speedup: list[float] = field(default_factory=list)  # median over repeats of history_full's ms / this method's
    kv_bytes: list[int] = field(default_factory=list)  # held after the step
    attended: list[int] = field(default_factory=list)  # history entries the step attended over
    attention_flops: list[float] = field(default_factory=list)
    step_flops: list[float] = field(default_factory=list)
    token_agreement_with_full: float | None = None  # over the episode's calls, against history_full's action tokens
    l1_vs_full: float | None = None  # mean |action - history_full's action| over the episode

    def at(self, env_step: int) -> dict:
        """The figures of the call at `env_step` (the last call at or before it)."""
        index = max(i for i, s in enumerate(self.env_steps) if s <= env_step)
        return {"method": self.method, "env_step": self.env_steps[index], "step_ms": self.step_ms[index],
                "speedup": self.speedup[index], "kv_bytes": self.kv_bytes[index], "attended": self.attended[index],
                "attention_flops": self.attention_flops[index], "step_flops": self.step_flops[index]}


def record_expert_frames(task: str, seed: int, env_steps: int, stride: int, image_size: int,
                         cameras: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [calls, cameras, S, S, 3] and proprio [calls, 4] every `stride` env steps of
    the task's scripted expert, run for `env_steps` steps whether or not it succeeds earlier."""
    from kvla.testbed.sim import SimEnv, expert_action

    images, proprio = [], []
    with SimEnv(task, seed, image_size=image_size, max_steps=env_steps, cameras=cameras) as env:
        observation = env.reset()
        for step in range(env_steps):
            if step % stride == 0:
                images.append(observation["images"])
                proprio.append(observation["proprio"])
            observation, _, _ = env.step(expert_action(task, observation["state"]))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(proprio))


def run_history_costs(policies: list, labels: list[str], images: torch.Tensor, proprio: torch.Tensor,
                      text_ids: torch.Tensor, stride: int, repeats: int = 3, progress: bool = True) -> list[HistoryCostCurve]:
    """policies[0] is the reference of the paired ratios (history_full)."""
    calls = len(images)
    timings = np.zeros((repeats, len(policies), calls))
    curves = [HistoryCostCurve(label) for label in labels]
    tokens = [[] for _ in policies]  # of the first repeat: each method's action tokens and actions per call
    actions = [[] for _ in policies]
    bar = tqdm(total=repeats * calls, desc="history costs", disable=not progress)
    for repeat in range(repeats):
        for policy in policies:
            policy.reset()
        for call in range(calls):
            order = [(call + repeat + k) % len(policies) for k in range(len(policies))]
            for index in order:
                policy = policies[index]
                out = policy.step(images[call:call + 1], text_ids, proprio[call:call + 1])
                timings[repeat, index, call] = out.step_ms
                if repeat == 0:
                    tokens[index].append(out.action_tokens)
                    actions[index].append(out.actions)
                    cfg, rows = policy.model.config, policy.layout.block_len
                    curve = curves[index]
                    curve.env_steps.append(call * stride)
                    curve.kv_bytes.append(out.kv_bytes)
                    curve.attended.append(out.attended_entries)
                    curve.attention_flops.append(history_attention_flops(cfg, rows, out.attended_entries))
                    curve.step_flops.append(history_step_flops(cfg, rows, out.attended_entries).total)
            bar.update()
    bar.close()
    for index, curve in enumerate(curves):
        curve.token_agreement_with_full = (torch.cat(tokens[index]) == torch.cat(tokens[0])).float().mean().item()
        curve.l1_vs_full = (torch.cat(actions[index]) - torch.cat(actions[0])).abs().mean().item()
        curve.step_ms = [statistics.median(timings[:, index, c]) for c in range(calls)]
        curve.speedup = [statistics.median(timings[:, 0, c] / timings[:, index, c]) for c in range(calls)]
    return curves


def curves_as_json(curves: list[HistoryCostCurve]) -> list[dict]:
    return [asdict(c) for c in curves]


def plot_history_costs(curves: list[HistoryCostCurve], path, marker_step: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("kv_bytes", "KV cache after the step, MiB", 2 ** -20), ("attention_flops", "attention GFLOPs per step", 1e-9),
              ("step_ms", "step latency, ms (median over repeats)", 1.0))
    for ax, (key, title, scale) in zip(axes, panels):
        for curve in curves:
            ax.plot(curve.env_steps, np.asarray(getattr(curve, key), dtype=float) * scale, label=curve.method)
        if marker_step is not None:
            ax.axvline(marker_step, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("episode step (env steps)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
