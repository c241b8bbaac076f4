"""What the change rules cost per step, on the reference VLA v2's patch shape (2 cameras of 8x8
patches of 16x16 RGB pixels, batch 1): the cosine rule, the photometric check as kvla computes it
(channel moments in one float64 pass), and the same check through torch.std over the strided
pixel axis (how kvla computed it before; the script asserts both give the same decisions).
Interleaved, medians of `--rounds` rounds of 20 calls, one torch thread.

    python scripts/change_rule_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvla.methods.change import patch_similarity, photometric_unchanged


def photometric_unchanged_by_std(patches, source, levels=2.0):
    """The reference formula: torch.mean and torch.std over each patch's pixels, per channel."""
    now, then = patches.unflatten(-1, (-1, 3)), source.unflatten(-1, (-1, 3))
    shift = (now.mean(-2) - then.mean(-2)).abs().amax(-1)
    contrast = (now.std(-2, correction=0) - then.std(-2, correction=0)).abs().amax(-1)
    return (shift <= levels) & (contrast <= levels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    shape = (1, args.tokens, 3 * args.patch ** 2)
    patches = torch.randint(0, 256, shape, generator=generator).float()
    # half the patches within sensor noise, half dimmed: both decisions occur
    source = (patches + torch.randint(-2, 3, shape, generator=generator)).clamp(0, 255)
    source[:, ::2] = (source[:, ::2] * 0.9).round()
    decided = photometric_unchanged(patches, source)
    if not torch.equal(decided, photometric_unchanged_by_std(patches, source)):
        raise SystemExit("the two photometric formulas disagree")
    print(f"{int(decided.sum())} of {args.tokens} patches unchanged")
    candidates = {
        "cosine rule": lambda: patch_similarity(patches, source, "cosine"),
        "photometric check (kvla)": lambda: photometric_unchanged(patches, source),
        "photometric check (torch.std)": lambda: photometric_unchanged_by_std(patches, source),
        "photometric rule (cosine + check)": lambda: patch_similarity(patches, source, "photometric"),
    }
    times = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, call in candidates.items():
            start = time.perf_counter()
            for _ in range(20):
                call()
            times[name].append((time.perf_counter() - start) / 20 * 1e3)
    for name, samples in times.items():
        print(f"{name:36s} {statistics.median(samples):.3f} ms")


if __name__ == "__main__":
    main()
