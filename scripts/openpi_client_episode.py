"""A closed-loop MetaWorld episode driven through `kvla serve` by the real `openpi-client`, as
robot code runs it. Runs in its own venv (openpi-client 0.1.2 pins numpy < 2), without kvla:
kvla's simulator module is loaded from its file, which needs only numpy and metaworld.

    make .venv-openpi/.installed
    kvla serve --checkpoint checkpoints/reference-vla-v2 --method vla_cache --port 8000 &
    .venv-openpi/bin/python scripts/openpi_client_episode.py --port 8000 --task push-v3 --out runs/openpi_episode.npz

Writes what the policy saw and answered (frames, proprio, action tokens per call) and the outcome,
so that the same frames can be replayed through the in-process policy.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
from openpi_client import websocket_client_policy

SIM_PATH = Path(__file__).resolve().parents[1] / "src" / "kvla" / "testbed" / "sim.py"


def load_sim():
    spec = importlib.util.spec_from_file_location("kvla_sim", SIM_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kvla_sim"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--task", default="push-v3")
    parser.add_argument("--seed", type=int, default=10000)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    sim = load_sim()
    sim.ensure_rendering()
    policy = websocket_client_policy.WebsocketClientPolicy(args.host, args.port, api_key=args.api_key)
    metadata = policy.get_server_metadata()
    cameras = tuple(metadata["observation"]["images"]["cameras"])
    size = metadata["observation"]["images"]["model_resolution"]
    per_call = metadata["actions_per_observation"]
    prompt = sim.ALL_TASKS[args.task]
    frames, proprios, tokens = [], [], []
    success, steps = False, 0
    with sim.SimEnv(args.task, args.seed, image_size=size, max_steps=args.max_steps, cameras=cameras) as env:
        observation = env.reset()
        done = False
        while not done:
            request = {"images": dict(zip(cameras, observation["images"])), "prompt": prompt,
                       "proprio": observation["proprio"], "reset": not frames}
            result = policy.infer(request)
            frames.append(observation["images"])
            proprios.append(observation["proprio"])
            tokens.append(result["action_tokens"])
            for action in result["actions"][:per_call]:  # a chunk is executed open loop
                observation, succeeded, done = env.step(action)
                steps += 1
                success |= succeeded
                if done:
                    break
    np.savez_compressed(args.out, images=np.stack(frames), proprio=np.stack(proprios), action_tokens=np.stack(tokens),
                        success=success, steps=steps, prompt=prompt, cameras=np.array(cameras))
    print(f"{args.task} seed {args.seed}: {'success' if success else 'failure'} after {steps} env steps, "
          f"{len(frames)} policy calls through kvla serve ({metadata['method']})")


if __name__ == "__main__":
    main()
