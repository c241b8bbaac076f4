"""Where failed episodes end: the final gripper-to-target and object-to-target distances.

A diagnostic for the reference VLA's weak tasks: does the policy reach the right region and miss
the success threshold by a little (precision), or go somewhere else (it did not find the goal)?
It runs `full` closed loop on the evaluation seeds and prints, per episode, the success and the
final distances in metres, next to the distance of the initial hand position (a policy that does
not move at all). Needs the `sim` extra.

    python scripts/final_distances.py --tasks reach-v3,push-v3 --episodes 10
"""

from __future__ import annotations

import statistics

import numpy as np
import torch
import typer

from kvla.testbed.evaluate import EVAL_SEED_START
from kvla.methods import parse_method
from kvla.policy import CachedVLAPolicy
from kvla.model.reference import checkpoint_cameras, load_policy_checkpoint
from kvla.testbed.sim import TASKS, SimEnv


def main(checkpoint: str = "checkpoints/reference-vla-v2", tasks: str = "reach-v3,push-v3,pick-place-v3",
         episodes: int = 10, max_steps: int = 200, threads: int = 2):
    torch.set_num_threads(threads)
    model, tokenizer = load_policy_checkpoint(checkpoint)
    cameras, config = checkpoint_cameras(checkpoint), model.config
    policy = CachedVLAPolicy(model, parse_method("full"))
    for task in tasks.split(","):
        text_ids = tokenizer.encode_batch([TASKS[task]])
        rows = []
        for seed in range(EVAL_SEED_START, EVAL_SEED_START + episodes):
            policy.reset()
            with SimEnv(task, seed, image_size=config.image_size, max_steps=max_steps, cameras=cameras) as env:
                observation, done, success = env.reset(), False, False
                raw = env._live_env
                target = np.array(raw._target_pos, dtype=np.float64)  # copies: mujoco hands out live views
                start_hand = np.array(raw.tcp_center, dtype=np.float64)
                start_object = np.array(raw._get_pos_objects()[:3], dtype=np.float64)
                while not done:
                    out = policy.step(torch.from_numpy(observation["images"])[None], text_ids,
                                      torch.from_numpy(observation["proprio"])[None])
                    # the whole chunk, open loop, as kvla eval runs it
                    for action in out.actions[0].reshape(config.action_chunk, config.action_dim).numpy():
                        observation, step_success, done = env.step(action)
                        success |= step_success
                        if done:
                            break
                hand = np.linalg.norm(np.asarray(raw.tcp_center) - target)
                obj = np.linalg.norm(np.asarray(raw._get_pos_objects()[:3]) - target)
                del raw  # a closed env collected while the next one is live blanks that one's frames
                rows.append((seed, success, hand, obj, np.linalg.norm(start_hand - target),
                             np.linalg.norm(start_object - target)))
        print(f"\n{task}: seed, success, final hand-target m, final object-target m (start: hand, object)")
        for seed, success, hand, obj, hand0, obj0 in rows:
            print(f"  {seed} {'ok  ' if success else 'fail'} hand {hand:.3f} object {obj:.3f}   (start {hand0:.3f}, {obj0:.3f})")
        failed = [r for r in rows if not r[1]]
        if failed:
            print(f"  failed episodes: median final hand-target {statistics.median(r[2] for r in failed):.3f} m, "
                  f"object-target {statistics.median(r[3] for r in failed):.3f} m")


if __name__ == "__main__":
    typer.run(main)
