"""`kvla eval --ray-address`: the same episodes, paired the same way, as the local process pool."""

import pytest

from test_testbed import _tiny_reference


def _fields(results):
    return [[(o.task, o.seed, o.method, o.success, o.steps, o.reuse, o.kv_bytes, o.flops) for o in job]
            for job in results]


def test_ray_runs_the_same_paired_episodes_as_the_local_pool(tmp_path):
    pytest.importorskip("metaworld")
    pytest.importorskip("ray")
    from kvla.testbed.evaluate import run_closed_loop

    model, tokenizer = _tiny_reference()
    model.save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    specs, tasks = ["full", "vla_cache:schedule=none"], ["reach-v3", "push-v3"]
    local = run_closed_loop(str(tmp_path), specs, tasks, 1, max_steps=4, workers=2, progress=False)
    on_ray = run_closed_loop(str(tmp_path), specs, tasks, 1, max_steps=4, workers=2, progress=False,
                             ray_address="local")
    assert [(job[0].task, job[0].seed) for job in on_ray] == [("reach-v3", 10_000), ("push-v3", 10_000)]
    assert _fields(on_ray) == _fields(local)
    assert any(r > 0 for job in on_ray for r in job[1].reuse)  # the reuse path ran on the workers
