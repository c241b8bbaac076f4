"""Per-part cost of lac's decision on one policy call (two 128 px cameras): the motion input
(Farneback flow or frame difference, both cameras), the selector + predictor forward, and the
whole plan() (incl. ranking). Medians over recorded demonstration frame pairs; run alone."""

import statistics
import sys
import time

import torch

from kvla.engine.state import EpisodeState
from kvla.methods.base import PlanContext
from kvla.methods.lac import LACModules, LearnedCaching, selector_inputs
from kvla.model.reference import load_policy_checkpoint
from kvla.policy import CachedVLAPolicy
from kvla.testbed.data import demo_index, load_demos


def main(data: str, checkpoint: str = "checkpoints/reference-vla-v2", repeats: int = 200) -> None:
    torch.set_num_threads(1)  # as in the closed loop's two workers
    model, tokenizer = load_policy_checkpoint(checkpoint)
    demo = load_demos(data, None, [demo_index(data)[-1].name])[0]
    frames = torch.as_tensor(demo.images)
    text = tokenizer.encode_batch([demo.instruction])
    for directory in ("checkpoints/lac-v2", "checkpoints/lac-v2-difference"):
        modules = LACModules.load(directory)
        method = LearnedCaching(modules=directory)
        policy = CachedVLAPolicy(model, method)
        inputs_ms, forward_ms, plan_ms, step_ms = [], [], [], []
        for i in range(repeats):
            t = (i * 4) % (len(frames) - 4)
            current, previous = frames[t + 4][None], frames[t][None]
            start = time.perf_counter()
            x = selector_inputs(current, previous, modules.config)
            middle = time.perf_counter()
            with torch.no_grad():
                modules(x, 1)
            end = time.perf_counter()
            inputs_ms.append((middle - start) * 1e3)
            forward_ms.append((end - middle) * 1e3)
            policy.reset()
            policy.step(previous, text, torch.as_tensor(demo.proprio[t])[None])
            out = policy.step(current, text, torch.as_tensor(demo.proprio[t + 4])[None])
            plan_ms.append(out.select_ms)
            step_ms.append(out.step_ms)
        med = statistics.median
        print(f"{directory} ({modules.config.motion}): motion input {med(inputs_ms):.2f} ms, selector+predictor "
              f"{med(forward_ms):.2f} ms, whole plan() {med(plan_ms):.2f} ms of a {med(step_ms):.1f} ms step "
              f"({100 * med(plan_ms) / med(step_ms):.1f} %)")


if __name__ == "__main__":
    main(*sys.argv[1:])
