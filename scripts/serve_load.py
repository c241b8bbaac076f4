"""Load test of `kvla serve` over loopback, bounded in time and count. Run alone (it times).

    python scripts/serve_load.py --checkpoint checkpoints/reference-vla-v2 --robots 64 --steps 8 \
        --json runs/serve_load.json

1. Latency and throughput: `robots` simulated robots (one websocket each, in a separate client
   process) each send `steps` observations lock-step (the next after the answer), against the
   server stepping one request at a time (max_batch 1) and batching (max_batch = robots), the two
   interleaved over `rounds` rounds; per request the client-side latency (send -> answer),
   p50 / p99, and throughput = requests / wall time of the round.
2. Robustness: `kill` clients connect, send a request each and their process is killed before
   any answer arrives; then the server must be healthy (/healthz 200), hold no session and no
   request, and its memory (RSS after gc and malloc_trim) must be back to where it was.

The frames are a MetaWorld scripted-expert episode per task (one task per robot, round robin),
so the reuse methods see real frame-to-frame change.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

TASKS = ["reach-v3", "push-v3", "drawer-close-v3", "button-press-topdown-v3", "window-close-v3", "door-open-v3",
         "drawer-open-v3", "window-open-v3"]


def record_frames(cameras, size, steps, stride):
    from kvla.measure.history_costs import record_expert_frames
    from kvla.testbed.sim import ALL_TASKS, ensure_rendering

    ensure_rendering()
    episodes = []
    for task in TASKS:
        images, proprio = record_expert_frames(task, 10000, steps * stride, stride, size, cameras)
        episodes.append({"task": task, "prompt": ALL_TASKS[task], "images": images.numpy(), "proprio": proprio.numpy()})
    return episodes


# ------------------------------------------------------------------ client process
def _client_main(uri, episodes, robots, steps, cameras, out_queue, kill_after_send=False):
    try:
        asyncio.run(_clients(uri, episodes, robots, steps, cameras, out_queue, kill_after_send))
    except BaseException as error:  # tell the parent instead of leaving it waiting
        out_queue.put({"error": repr(error)})
        raise


async def _clients(uri, episodes, robots, steps, cameras, out_queue, kill_after_send):
    from websockets.asyncio.client import connect

    from kvla.serve.protocol import pack, unpack

    latencies = []
    connected = asyncio.Event()
    ready = 0

    async def robot(index):
        nonlocal ready
        episode = episodes[index % len(episodes)]
        async with connect(uri, compression=None, max_size=None, open_timeout=60) as socket:
            unpack(await socket.recv())
            ready += 1
            if ready == robots:
                connected.set()
            await connected.wait()
            for step in range(steps):
                observation = {"images": dict(zip(cameras, episode["images"][step])), "prompt": episode["prompt"],
                               "proprio": episode["proprio"][step], "reset": step == 0}
                sent = time.perf_counter()
                await socket.send(pack(observation))
                if kill_after_send:
                    out_queue.put("sent")
                    await asyncio.sleep(3600)  # the process is killed here, mid-request
                answer = await socket.recv()
                if isinstance(answer, str):
                    raise RuntimeError(answer)
                latencies.append((time.perf_counter() - sent) * 1e3)

    started = time.perf_counter()
    await asyncio.gather(*(robot(i) for i in range(robots)))
    out_queue.put({"latencies_ms": latencies, "wall_s": time.perf_counter() - started})


# ------------------------------------------------------------------ server side
def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def settle_memory() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return rss_mib()


def health(port) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        return {"status_code": response.status, **json.loads(response.read())}


def run_round(port, episodes, robots, steps, cameras) -> dict:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_client_main, args=(f"ws://127.0.0.1:{port}", episodes, robots, steps, cameras,
                                                         results))
    process.start()
    result = results.get(timeout=900)
    process.join(60)
    if "error" in result:
        raise RuntimeError(f"a client failed: {result['error']}")
    latencies = sorted(result["latencies_ms"])
    return {"requests": len(latencies), "wall_s": result["wall_s"],
            "throughput_per_s": len(latencies) / result["wall_s"],
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99))}


def kill_clients(port, episodes, count, cameras) -> None:
    context = multiprocessing.get_context("spawn")
    signals = context.Queue()
    process = context.Process(target=_client_main, args=(f"ws://127.0.0.1:{port}", episodes, count, 1, cameras,
                                                         signals, True))
    process.start()
    for _ in range(count):  # every client has sent its request
        if isinstance(signal_or_error := signals.get(timeout=300), dict):
            raise RuntimeError(f"a client failed: {signal_or_error['error']}")
    os.kill(process.pid, signal.SIGKILL)
    process.join(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/reference-vla-v2")
    parser.add_argument("--method", default="full")
    parser.add_argument("--robots", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kill", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    from kvla.model.reference import checkpoint_cameras
    from kvla.model.vla import VLAModel
    from kvla.serve.server import BackgroundServer, ServeSettings, build_server

    torch.set_num_threads(args.threads)
    cameras = checkpoint_cameras(args.checkpoint)
    size = VLAModel.from_pretrained(args.checkpoint).config.image_size
    episodes = record_frames(cameras, size, args.steps, stride=4)
    report = {"checkpoint": args.checkpoint, "method": args.method, "robots": args.robots, "steps": args.steps,
              "threads": args.threads, "machine": f"{os.cpu_count()} CPUs, {sys.platform}", "rounds": []}
    servers = {}
    for name, max_batch in (("one at a time", 1), ("batched", args.robots)):
        settings = ServeSettings(port=0, max_batch=max_batch, max_wait_ms=2.0, max_sessions=max(args.robots, args.kill))
        servers[name] = BackgroundServer(build_server(args.checkpoint, args.method, settings))
    for round_index in range(args.rounds):  # the two servers interleaved, order alternating
        order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
        for name in order:
            figures = run_round(servers[name].server.port, episodes, args.robots, args.steps, cameras)
            report["rounds"].append({"server": name, "round": round_index, **figures})
            print(json.dumps(report["rounds"][-1]), flush=True)
    for name in servers:
        rows = [r for r in report["rounds"] if r["server"] == name]
        report[name] = {key: statistics.median(r[key] for r in rows) for key in ("throughput_per_s", "p50_ms", "p99_ms")}
    report["batched_throughput_vs_one_at_a_time"] = (report["batched"]["throughput_per_s"]
                                                     / report["one at a time"]["throughput_per_s"])
    report["batched_p99_over_p50"] = report["batched"]["p99_ms"] / report["batched"]["p50_ms"]

    batched = servers["batched"]
    before = settle_memory()
    kill_clients(batched.server.port, episodes, args.kill, cameras)
    deadline = time.monotonic() + 120
    while (batched.server.sessions or batched.server.in_flight) and time.monotonic() < deadline:
        time.sleep(0.1)
    after = settle_memory()
    report["kill"] = {"clients": args.kill, "health_after": health(batched.server.port),
                      "sessions_left": len(batched.server.sessions), "in_flight_left": batched.server.in_flight,
                      "rss_before_mib": before, "rss_after_mib": after}
    report["after_kill_round"] = run_round(batched.server.port, episodes, args.robots, min(2, args.steps), cameras)  # still serving
    for server in servers.values():
        server.stop()
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
