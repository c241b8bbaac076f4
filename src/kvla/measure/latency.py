"""Latency benchmark: methods interleaved step by step over a real sequence of camera frames."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from kvla.measure.flops import cache_slots, kv_bytes, step_flops
from kvla.measure.frames import Episode
from kvla.methods import method_label, parse_method
from kvla.model.vla import VLAModel
from kvla.policy import CachedVLAPolicy


@dataclass
class LatencyRecord:
    method: str
    step_ms: float  # median whole step: vision + selection + prefill + action decoding
    prefill_ms: float
    speedup_step: float  # median of paired per-step ratios full / method
    speedup_prefill: float
    reuse_ratio: float  # mean fraction of visual (token, layer) computations skipped
    flops: float  # mean FLOPs per step
    kv_bytes: int
    select_ms: float  # median time spent choosing what to reuse
    decode_ms: float
    vision_ms: float
    steps: int
    flops_by_part: dict  # mean FLOPs per step: vision, prefill, action_decoding, head
    prefill_tokens_per_layer: list[float]  # mean rows computed in each decoder layer
    # mean prefill attention FLOPs: executed (dense over every key slot) and visible (what the mask lets through)
    prefill_attention_flops: dict | None = None
    # against full on the same frames: share of equal action tokens, mean |action - full's action|
    token_agreement_with_full: float | None = None
    l1_vs_full: float | None = None


def _median(values):
    return float(statistics.median(values)) if values else float("nan")


def run_latency(model: VLAModel, method_specs: list[str], episode: Episode, *, steps: int | None = None,
                skip_first: int = 1, warmup_steps: int = 2, text_seed: int = 0, progress: bool = True) -> list[LatencyRecord]:
    """Run every method over the same frames, interleaved (rotating order each step).

    Each method has its own episode state. The first `skip_first` steps (the full first frame)
    are left out of the statistics. `full` is always run, as the reference of the paired ratios.
    """
    specs = list(dict.fromkeys(["full", *method_specs]))
    methods = [parse_method(spec) for spec in specs]
    labels = [method_label(m) for m in methods]
    policies = [CachedVLAPolicy(model, m) for m in methods]
    frames = episode.frames[: steps] if steps else episode.frames
    if len(frames) <= skip_first:
        raise ValueError(f"need more than {skip_first} frames, got {len(frames)}")
    generator = torch.Generator().manual_seed(text_seed)
    text_ids = torch.randint(3, model.config.vocab_size - 300, (1, model.config.num_text_tokens), generator=generator)

    for policy in policies:  # warm up kernels and allocators, then start clean
        policy.reset()
        for t in range(min(warmup_steps, len(frames))):
            policy.step(frames[t:t + 1], text_ids)
        policy.reset()

    outputs = [[] for _ in policies]
    for t in tqdm(range(len(frames)), desc="steps", disable=not progress):
        shift = t % len(policies)
        for index in list(range(len(policies)))[shift:] + list(range(len(policies)))[:shift]:
            outputs[index].append(policies[index].step(frames[t:t + 1], text_ids))

    records = []
    reference = outputs[0][skip_first:]
    layout = model.layout
    bytes_per_element = torch.finfo(next(model.parameters()).dtype).bits // 8
    for label, outs in zip(labels, outputs):
        measured = outs[skip_first:]
        counts = [step_flops(model.config, layout, o.computed_tokens, batch=1, statistic_rows=o.statistic_rows,
                             visible_keys=o.visible_keys) for o in measured]
        flops = [c.total for c in counts]
        parts = {part: float(statistics.fmean(getattr(c, part) for c in counts))
                 for part in ("vision", "prefill", "action_decoding", "head")}
        tokens_per_layer = [float(statistics.fmean(c.prefill_tokens_per_layer[l] for c in counts))
                            for l in range(model.config.num_layers)]
        records.append(LatencyRecord(
            method=label,
            step_ms=_median([o.step_ms for o in measured]),
            prefill_ms=_median([o.prefill_ms for o in measured]),
            speedup_step=_median([r.step_ms / o.step_ms for r, o in zip(reference, measured)]),
            speedup_prefill=_median([r.prefill_ms / o.prefill_ms for r, o in zip(reference, measured)]),
            reuse_ratio=float(statistics.fmean(o.reuse_ratio for o in measured)),
            flops=float(statistics.fmean(flops)),
            kv_bytes=kv_bytes(model.config, cache_slots(layout), 1, bytes_per_element),
            select_ms=_median([o.select_ms for o in measured]),
            decode_ms=_median([o.decode_ms for o in measured]),
            vision_ms=_median([o.vision_ms for o in measured]),
            steps=len(measured),
            flops_by_part=parts,
            prefill_tokens_per_layer=tokens_per_layer,
            prefill_attention_flops={kind: float(statistics.fmean(getattr(c, f"prefill_attention_{kind}") for c in counts))
                                     for kind in ("dense", "visible")},
            token_agreement_with_full=float(torch.cat([(o.action_tokens == r.action_tokens).float().flatten()
                                                       for o, r in zip(measured, reference)]).mean()),
            l1_vs_full=float(torch.cat([(o.actions - r.actions).abs().flatten()
                                        for o, r in zip(measured, reference)]).mean()),
        ))
    return records


def records_as_json(records: list[LatencyRecord]) -> list[dict]:
    return [asdict(r) for r in records]
