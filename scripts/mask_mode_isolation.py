"""What reuse costs under a block mask even when the frame is pixel-identical.

For held-out demonstration frames t of a trained checkpoint: step 1 is the frame with its proprio
(nothing reused); step 2 is the same frame with the proprio of frame t + gap, every visual token
reused in every layer. Under a causal mask the visual K/V cannot depend on the proprio token after
them, so step 2 equals a fresh full step; under a prefix-LM or bidirectional mask it depends on it.
Prints the deviation of the action logits and the action-token agreement against the fresh step.

    python scripts/mask_mode_isolation.py --checkpoint checkpoints/reference-vla-v2 \\
        --checkpoint runs/policy-v2-bidirectional/best --data data/mt10_wrist.hdf5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvla import EpisodeState, PartialPrefillEngine, ReusePlan
from kvla.model.reference import checkpoint_cameras, load_policy_checkpoint
from kvla.testbed.data import demo_index, load_demos
from kvla.testbed.train import split_demos


def measure(checkpoint: Path, data: Path, episodes_per_task: int, gap: int, stride: int) -> dict:
    model, tokenizer = load_policy_checkpoint(checkpoint)
    cameras = checkpoint_cameras(checkpoint)
    _, held_out = split_demos(demo_index(data), 4)
    chosen: dict[str, list] = {}
    for info in held_out:
        if len(chosen.setdefault(info.task, [])) < episodes_per_task:
            chosen[info.task].append(info.name)
    demos = load_demos(data, cameras, [n for names in chosen.values() for n in names])
    engine, layout = PartialPrefillEngine(model.language_model), model.layout
    reuse_all = ReusePlan(visual_depth=torch.zeros(1, layout.num_visual, dtype=torch.long))
    deviations, relative, agree, count = [], [], 0, 0
    with torch.no_grad():
        for demo in demos:
            text = tokenizer.encode_batch([demo.instruction])
            for t in range(0, len(demo.actions) - gap, stride):
                image = model.policy_images(torch.as_tensor(demo.images[t])[None])
                visual = model.encode_images(image)
                before = model.prompt_embeddings(visual, text, torch.as_tensor(demo.proprio[t], dtype=torch.float32)[None])
                after = model.prompt_embeddings(visual, text, torch.as_tensor(demo.proprio[t + gap], dtype=torch.float32)[None])
                state = EpisodeState()
                engine.prefill(before, layout, ReusePlan.full(1, layout, engine.num_layers), state)
                reused = engine.prefill(after, layout, reuse_all, state).logits
                fresh = engine.prefill(after, layout, ReusePlan.full(1, layout, engine.num_layers), EpisodeState()).logits
                deviations.append((reused - fresh).abs().max().item())
                relative.append(((reused - fresh).norm() / fresh.norm()).item())
                agree += int((reused.argmax(-1) == fresh.argmax(-1)).sum())
                count += reused.shape[1]
    deviations_t, relative_t = torch.tensor(deviations), torch.tensor(relative)
    return {"checkpoint": str(checkpoint), "mask_mode": layout.mask_mode, "steps": len(deviations),
            "gap": gap, "max_abs_logit_deviation": deviations_t.max().item(),
            "median_max_abs_logit_deviation": deviations_t.median().item(),
            "median_relative_logit_deviation": relative_t.median().item(),
            "action_token_agreement": agree / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, action="append", required=True)
    parser.add_argument("--data", type=Path, default=Path("data/mt10_wrist.hdf5"))
    parser.add_argument("--episodes-per-task", type=int, default=2)
    parser.add_argument("--gap", type=int, default=4, help="Env steps between the two proprio readings (one chunk).")
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = [measure(c, args.data, args.episodes_per_task, args.gap, args.stride) for c in args.checkpoint]
    for r in results:
        print(json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
