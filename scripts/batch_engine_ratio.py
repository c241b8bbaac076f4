"""The engine alone, no network: one batched step of 64 robots' episodes (`step_episodes`) against
64 single-sample steps, interleaved over 4 rounds, reference VLA v2, method full, 2 threads.
Run alone: python scripts/batch_engine_ratio.py"""
import time, statistics, torch
from kvla.engine.state import EpisodeState
from kvla.model.reference import load_policy_checkpoint
from kvla.policy import CachedVLAPolicy
torch.set_num_threads(2)
model, tok = load_policy_checkpoint("checkpoints/reference-vla-v2")
policy = CachedVLAPolicy(model, "full")
N = 64
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (N, 2, 128, 128, 3), dtype=torch.uint8, generator=g)
text = tok.encode_batch(["push the puck to the goal"] * N)
proprio = torch.randn(N, 4, generator=g)
states = [EpisodeState() for _ in range(N)]
seq_states = [EpisodeState() for _ in range(N)]
def batched():
    outs = policy.step_episodes(states, images, text, proprio)
    return outs[0]
def one_by_one():
    for i in range(N):
        policy.state = seq_states[i]
        policy.step(images[i:i+1], text[i:i+1], proprio[i:i+1])
bt, st, parts = [], [], []
for r in range(4):
    for name, fn in (("b", batched), ("s", one_by_one)) if r % 2 == 0 else (("s", one_by_one), ("b", batched)):
        t = time.perf_counter(); out = fn(); dt = time.perf_counter() - t
        (bt if name == "b" else st).append(dt)
        if name == "b": parts.append((out.vision_ms, out.select_ms, out.prefill_ms, out.decode_ms))
print("batched s/step-of-64:", [round(x,2) for x in bt], "one-by-one:", [round(x,2) for x in st])
print("ratio (median):", statistics.median(st)/statistics.median(bt))
print("batched parts ms (vision, select, prefill, decode):", [tuple(round(p,1) for p in q) for q in parts])
