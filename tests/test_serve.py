"""`kvla serve` over loopback: openpi's framing, one episode per connection, robots kept apart,
bad input refused without harm to anyone, the API key, /healthz and a graceful shutdown."""

import contextlib
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from kvla.model.reference import InstructionTokenizer
from kvla.model.vla import VLAModel
from kvla.policy import CachedVLAPolicy
from kvla.serve.protocol import pack, unpack
from kvla.serve.schema import ObservationSchema
from kvla.serve.server import BackgroundServer, PolicyServer, ServeSettings


CAMERAS = ("corner2", "gripperPOV")
INSTRUCTIONS = ["push the puck to the goal", "open the drawer"]


def serving(policy, schema, **settings):
    """A test server for this policy on a free loopback port."""
    return BackgroundServer(PolicyServer(policy, schema, {"server": "kvla-test"}, ServeSettings(port=0, **settings)))


def _model_and_schema(tokenizer):
    model = VLAModel.from_preset("tiny", seed=0, proprio_dim=4, num_cameras=2,
                                 vocab_size=tokenizer.text_vocab_size + 256, num_text_tokens=tokenizer.max_length)
    return model, ObservationSchema(model.config, CAMERAS, tokenizer, max_image_side=64)


@pytest.fixture(scope="module")
def tokenizer():
    return InstructionTokenizer.from_instructions(INSTRUCTIONS)


@pytest.fixture
def running(tokenizer):
    model, schema = _model_and_schema(tokenizer)
    server = serving(CachedVLAPolicy(model, "vla_cache"), schema)
    yield server, model
    server.stop()


def _frames(seed, steps):
    """A scene per seed whose frames change a little from step to step."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (2, 32, 32, 3))
    frames = []
    for _ in range(steps):
        base = np.clip(base + rng.integers(-3, 4, base.shape), 0, 255)
        frames.append(base.astype(np.uint8))
    return frames, rng.standard_normal((steps, 4))


def _observation(frame, proprio, prompt=INSTRUCTIONS[0], **extra):
    return {"images": {c: frame[i] for i, c in enumerate(CAMERAS)}, "prompt": prompt, "proprio": proprio, **extra}


def test_two_interleaved_robots_get_what_two_separate_policies_give(running, tokenizer):
    server, model = running
    scenes = {robot: _frames(seed=robot, steps=4) for robot in (0, 1)}
    prompts = {0: INSTRUCTIONS[0], 1: INSTRUCTIONS[1]}
    served = {0: [], 1: []}
    with connect(server.uri, compression=None, max_size=None) as robot0, \
            connect(server.uri, compression=None, max_size=None) as robot1:
        metadata = unpack(robot0.recv())
        unpack(robot1.recv())
        assert metadata["observation"]["images"]["cameras"] == list(CAMERAS)
        for step in range(4):
            for robot, socket in ((0, robot0), (1, robot1)):
                frames, proprio = scenes[robot]
                socket.send(pack(_observation(frames[step], proprio[step], prompts[robot])))
                response = unpack(socket.recv())
                assert response["actions"].shape == (model.config.action_chunk, model.config.action_dim)
                assert response["episode_step"] == step
                served[robot].append(response["action_tokens"])
    for robot in (0, 1):
        alone = CachedVLAPolicy(model, "vla_cache")
        frames, proprio = scenes[robot]
        for step in range(4):
            out = alone.step(torch.from_numpy(frames[step])[None], tokenizer.encode_batch([prompts[robot]]),
                             torch.from_numpy(proprio[step]).float()[None])
            np.testing.assert_array_equal(served[robot][step], out.action_tokens[0].numpy())


def test_reset_starts_a_new_episode_on_the_open_connection(running):
    server, _ = running
    frames, proprio = _frames(seed=3, steps=3)
    with connect(server.uri, compression=None, max_size=None) as robot:
        unpack(robot.recv())
        first = []
        for step in range(2):
            robot.send(pack(_observation(frames[step], proprio[step])))
            first.append(unpack(robot.recv()))
        robot.send(pack(_observation(frames[0], proprio[0], reset=True)))
        again = unpack(robot.recv())
    assert again["episode_step"] == 0
    np.testing.assert_array_equal(again["action_tokens"], first[0]["action_tokens"])


def test_bad_input_is_refused_by_name_and_harms_no_one(running):
    server, _ = running
    frames, proprio = _frames(seed=4, steps=2)
    with connect(server.uri, compression=None, max_size=None) as robot, \
            connect(server.uri, compression=None, max_size=None) as other:
        unpack(robot.recv())
        unpack(other.recv())
        robot.send(pack(_observation(frames[0], np.array([0.0, np.nan, 0.0, 0.0]))))
        refusal = robot.recv()
        assert isinstance(refusal, str) and "proprio: holds nan" in refusal
        robot.send(pack(_observation(frames[0], proprio[0])))  # the same connection goes on
        assert unpack(robot.recv())["episode_step"] == 0
        robot.send(pack(_observation(frames[1], proprio[1]))[:-5])  # truncated
        assert "malformed message" in robot.recv()
        with pytest.raises(ConnectionClosed) as closed:
            robot.recv()
        assert closed.value.rcvd.code == 1007
        other.send(pack(_observation(frames[0], proprio[0])))  # the other robot is unharmed
        assert unpack(other.recv())["episode_step"] == 0
        other.send("a text frame")
        assert "text frame" in other.recv()
        with pytest.raises(ConnectionClosed) as closed:
            other.recv()
        assert closed.value.rcvd.code == 1003
    assert _wait_for(lambda: not server.server.sessions)


def _wait_for(condition, seconds=10.0):
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_health_sessions_and_the_session_limit(tokenizer):
    model, schema = _model_and_schema(tokenizer)
    server = serving(CachedVLAPolicy(model, "full"), schema, max_sessions=1)
    try:
        health = urllib.request.urlopen(f"http://127.0.0.1:{server.server.port}/healthz", timeout=10).read()
        assert b'"status": "ok"' in health
        with connect(server.uri) as robot:
            unpack(robot.recv())
            with pytest.raises(InvalidStatus) as refused:
                connect(server.uri)
            assert refused.value.response.status_code == 503
        assert _wait_for(lambda: not server.server.sessions)  # a closed connection frees its session
        with connect(server.uri) as robot:
            assert "observation" in unpack(robot.recv())
    finally:
        server.stop()


def test_the_api_key(tokenizer):
    model, schema = _model_and_schema(tokenizer)
    server = serving(CachedVLAPolicy(model, "full"), schema, api_key="s3cret")
    try:
        for headers in ({}, {"Authorization": "Api-Key wrong"}):
            with pytest.raises(InvalidStatus) as refused:
                connect(server.uri, additional_headers=headers)
            assert refused.value.response.status_code == 401
        with connect(server.uri, additional_headers={"Authorization": "Api-Key s3cret"}) as robot:
            assert "observation" in unpack(robot.recv())
        urllib.request.urlopen(f"http://127.0.0.1:{server.server.port}/healthz", timeout=10)  # health needs no key
    finally:
        server.stop()


def test_an_idle_robot_is_disconnected_and_its_session_freed(tokenizer):
    model, schema = _model_and_schema(tokenizer)
    server = serving(CachedVLAPolicy(model, "full"), schema, idle_timeout_s=0.3)
    try:
        with connect(server.uri) as robot:
            unpack(robot.recv())
            with pytest.raises(ConnectionClosed) as closed:
                robot.recv(timeout=10)
            assert closed.value.rcvd.reason == "idle timeout"
        assert _wait_for(lambda: not server.server.sessions)
    finally:
        server.stop()


def _gated_policy(model):
    """A policy whose steps wait, once entered, until `release` is set: a step held in flight."""
    policy = CachedVLAPolicy(model, "full")
    entered, release = threading.Event(), threading.Event()
    step = policy.step

    def gated_step(*args):
        entered.set()
        release.wait(10)
        return step(*args)

    policy.step = gated_step
    return policy, entered, release


def test_shutdown_answers_the_step_in_flight(tokenizer):
    model, schema = _model_and_schema(tokenizer)
    policy, entered, release = _gated_policy(model)
    server = serving(policy, schema)
    frames, proprio = _frames(seed=5, steps=1)
    with connect(server.uri) as robot:
        unpack(robot.recv())
        robot.send(pack(_observation(frames[0], proprio[0])))
        assert entered.wait(10)
        server.request_stop()
        assert _wait_for(lambda: server.server.draining)
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"http://127.0.0.1:{server.server.port}/healthz", timeout=10)
        assert health.value.code == 503
        release.set()
        assert unpack(robot.recv())["episode_step"] == 0  # the step in flight is answered
    server.thread.join(30)
    assert not server.thread.is_alive()


def test_kvla_serve_runs_a_history_vla_and_stops_on_sigterm(tmp_path):
    """The command as a robot meets it: a history VLA's episode through the server, an instruction
    changed mid-episode refused with the way out, and a clean exit on SIGTERM."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from conftest import make_history_checkpoint
    from kvla.testbed.sim import TASKS

    make_history_checkpoint(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from kvla.cli import app; app()", "serve", "--checkpoint", str(tmp_path), "--method", "history_full",
               "--port", str(port), "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.poll() is not None else "no /healthz"
                time.sleep(0.2)
        frame = np.zeros((32, 32, 3), np.uint8)
        with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as robot:
            metadata = unpack(robot.recv())
            assert metadata["method"] == "history_full"
            observation = {"images": {c: frame for c in metadata["observation"]["images"]["cameras"]},
                           "prompt": TASKS["push-v3"], "proprio": np.zeros(4)}
            for step in range(2):
                robot.send(pack(observation))
                assert unpack(robot.recv())["episode_step"] == step
            robot.send(pack({**observation, "prompt": TASKS["reach-v3"]}))
            refusal = robot.recv()
            assert "instruction changed" in refusal and "reset=True" in refusal
            robot.send(pack({**observation, "prompt": TASKS["reach-v3"], "reset": True}))
            assert unpack(robot.recv())["episode_step"] == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_robots_arriving_together_are_batched_and_each_gets_its_own_episode(tokenizer):
    model, schema = _model_and_schema(tokenizer)
    robots, steps = 4, 3
    server = serving(CachedVLAPolicy(model, "vla_cache:top_k=40:schedule=none"), schema, max_batch=8,
                           max_wait_ms=200.0)
    scenes = {robot: _frames(seed=10 + robot, steps=steps) for robot in range(robots)}
    served = {robot: [] for robot in range(robots)}
    batch_sizes = []
    barrier = threading.Barrier(robots)

    def robot_loop(robot):
        frames, proprio = scenes[robot]
        with connect(server.uri, compression=None, max_size=None) as socket:
            unpack(socket.recv())
            for step in range(steps):
                barrier.wait(30)  # all robots send each step together
                socket.send(pack(_observation(frames[step], proprio[step], INSTRUCTIONS[robot % 2])))
                response = unpack(socket.recv())
                served[robot].append(response["action_tokens"])
                batch_sizes.append(response["server_timing"]["batch_size"])

    try:
        threads = [threading.Thread(target=robot_loop, args=(robot,)) for robot in range(robots)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        server.stop()
    assert max(batch_sizes) > 1  # requests of different robots did share a step
    for robot in range(robots):
        alone = CachedVLAPolicy(model, "vla_cache:top_k=40:schedule=none")
        frames, proprio = scenes[robot]
        assert len(served[robot]) == steps
        for step in range(steps):
            out = alone.step(torch.from_numpy(frames[step])[None], tokenizer.encode_batch([INSTRUCTIONS[robot % 2]]),
                             torch.from_numpy(proprio[step]).float()[None])
            np.testing.assert_array_equal(served[robot][step], out.action_tokens[0].numpy())


def test_an_oversized_message_and_a_disconnect_mid_request_leave_the_server_serving(tokenizer):
    model, schema = _model_and_schema(tokenizer)
    policy, entered, release = _gated_policy(model)
    server = serving(policy, schema, max_message_bytes=20_000)
    frames, proprio = _frames(seed=6, steps=1)
    try:
        with connect(server.uri, compression=None, max_size=None) as robot:
            unpack(robot.recv())
            robot.send(pack({"images": {c: np.zeros((64, 64, 3), np.uint8) for c in CAMERAS}}))  # 24 KiB
            with pytest.raises(ConnectionClosed) as closed:
                robot.recv()
            assert closed.value.rcvd.code == 1009  # message too big
        with connect(server.uri, compression=None, max_size=None) as leaving:
            unpack(leaving.recv())
            leaving.send(pack(_observation(frames[0], proprio[0])))
            assert entered.wait(10)
            leaving.close()  # gone while its step runs
        release.set()
        assert _wait_for(lambda: not server.server.sessions and server.server.in_flight == 0)
        with connect(server.uri, compression=None, max_size=None) as robot:
            unpack(robot.recv())
            robot.send(pack(_observation(frames[0], proprio[0])))
            assert unpack(robot.recv())["episode_step"] == 0
    finally:
        release.set()
        server.stop()


def test_a_server_that_cannot_start_says_why(tokenizer):
    import socket

    model, schema = _model_and_schema(tokenizer)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = PolicyServer(CachedVLAPolicy(model, "full"), schema, {}, ServeSettings(port=port))
        with pytest.raises(RuntimeError, match="failed to start"):
            BackgroundServer(server, start_timeout_s=30)


def test_two_authorization_headers_are_refused_not_an_error(tokenizer):
    model, schema = _model_and_schema(tokenizer)
    server = serving(CachedVLAPolicy(model, "full"), schema, api_key="k")
    try:
        from websockets.datastructures import Headers

        headers = Headers([("Authorization", "Api-Key k"), ("Authorization", "Api-Key k")])
        with pytest.raises(InvalidStatus) as refused:
            connect(server.uri, additional_headers=headers)
        assert refused.value.response.status_code == 401
    finally:
        server.stop()


def test_a_history_episode_ends_at_the_trained_length(tokenizer):
    from kvla.history_policy import HistoryVLAPolicy
    from kvla.model.history import HistoryConfig

    model = VLAModel.from_preset("tiny", seed=0, proprio_dim=4, num_cameras=2, parallel_actions=True, action_chunk=2,
                                 vocab_size=tokenizer.text_vocab_size + 256, num_text_tokens=tokenizer.max_length)
    schema = ObservationSchema(model.config, CAMERAS, tokenizer, max_image_side=64)
    server = serving(HistoryVLAPolicy(model, HistoryConfig(frame_stride=2, max_frames=2), "history_full"), schema)
    frames, proprio = _frames(seed=7, steps=3)
    try:
        with connect(server.uri, compression=None, max_size=None) as robot:
            unpack(robot.recv())
            for step in range(2):
                robot.send(pack(_observation(frames[step], proprio[step])))
                assert unpack(robot.recv())["episode_step"] == step
            robot.send(pack(_observation(frames[2], proprio[2])))
            refusal = robot.recv()
            assert "reached the history VLA's 2 steps" in refusal and "reset=True" in refusal
            robot.send(pack(_observation(frames[2], proprio[2], reset=True)))
            assert unpack(robot.recv())["episode_step"] == 0
    finally:
        server.stop()


def test_shutdown_is_bounded_when_a_step_hangs(tokenizer):
    import time

    model, schema = _model_and_schema(tokenizer)
    policy, entered, release = _gated_policy(model)
    server = serving(policy, schema, shutdown_timeout_s=0.5)
    frames, proprio = _frames(seed=8, steps=1)
    try:
        with connect(server.uri) as robot:
            unpack(robot.recv())
            robot.send(pack(_observation(frames[0], proprio[0])))
            assert entered.wait(10)
            started = time.monotonic()
            server.stop(timeout_s=10)  # the step never finishes by itself
            assert time.monotonic() - started < 5
            answer = robot.recv(timeout=10)
            assert isinstance(answer, str) and "internal error" in answer
    finally:
        release.set()


def test_a_bfloat16_server_answers_what_a_bfloat16_policy_gives(tmp_path):
    """--dtype bfloat16: the served model is the checkpoint cast as asked, published in the metadata,
    and its actions are the in-process bfloat16 policy's."""
    from test_testbed import INSTRUCTIONS as TESTBED_INSTRUCTIONS, _tiny_reference

    from kvla.model.reference import checkpoint_cameras
    from kvla.serve.server import build_server

    model, tokenizer = _tiny_reference()
    model.save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    server = BackgroundServer(build_server(tmp_path, "vla_cache", ServeSettings(port=0), dtype="bfloat16"))
    cameras = checkpoint_cameras(tmp_path)
    rng = np.random.default_rng(0)
    side = model.config.image_size
    frames = [rng.integers(0, 256, (len(cameras), side, side, 3), dtype=np.uint8) for _ in range(3)]
    frames[1][:, :8] = frames[0][:, :8]  # part of the scene stays put, so something is reused
    prompt = TESTBED_INSTRUCTIONS[0]
    proprio = rng.standard_normal(model.config.proprio_dim).astype(np.float32) if model.config.proprio_dim else None
    extra = {"proprio": proprio} if proprio is not None else {}
    try:
        with connect(server.uri, compression=None, max_size=None) as robot:
            metadata = unpack(robot.recv())
            assert metadata["dtype"] == "bfloat16" and metadata["device"] == "cpu"
            served = []
            for frame in frames:
                robot.send(pack({"images": dict(zip(cameras, frame)), "prompt": prompt, **extra}))
                served.append(unpack(robot.recv())["action_tokens"])
    finally:
        server.stop()
    alone = CachedVLAPolicy(VLAModel.from_pretrained(tmp_path).to(dtype=torch.bfloat16).eval(), "vla_cache")
    assert alone.engine.dtype == torch.bfloat16
    for frame, tokens in zip(frames, served):
        out = alone.step(torch.from_numpy(frame)[None], tokenizer.encode_batch([prompt]),
                         torch.from_numpy(proprio)[None] if proprio is not None else None)
        np.testing.assert_array_equal(tokens, out.action_tokens[0].numpy())


def test_bad_device_or_dtype_is_refused_by_name(tmp_path):
    from test_testbed import _tiny_reference

    from kvla.serve.server import build_server

    model, tokenizer = _tiny_reference()
    model.save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        build_server(tmp_path, "full", ServeSettings(port=0), dtype="float16")
    with pytest.raises(ValueError, match="not a torch device"):
        build_server(tmp_path, "full", ServeSettings(port=0), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            build_server(tmp_path, "full", ServeSettings(port=0), device="cuda")


def test_fuzzed_messages_through_a_live_server_are_answered_refused_or_closed_never_a_crash(tokenizer):
    """Hypothesis drives one robot with random bytes, random observation maps and good observations;
    every reply is actions, a refusal naming the field, or a clean close with a protocol code, and a
    second robot stepping between them gets exactly what it gets alone."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from test_serve_schema import _values

    model, schema = _model_and_schema(tokenizer)
    server = serving(CachedVLAPolicy(model, "vla_cache"), schema)
    frames, proprio = _frames(seed=7, steps=1)
    good = pack(_observation(frames[0], proprio[0]))
    keys = st.sampled_from(["images", "prompt", "text_ids", "proprio", "reset", "other"])
    observations = st.tuples(st.dictionaries(keys, _values(), max_size=5), st.booleans())
    messages = st.one_of(st.binary(max_size=256).map(lambda b: ("bytes", b)),
                         observations.map(lambda o: ("map", o)), st.just(("good", good)))
    alone = CachedVLAPolicy(model, "vla_cache").step(torch.from_numpy(frames[0])[None],
                                                      tokenizer.encode_batch([INSTRUCTIONS[0]]),
                                                      torch.from_numpy(proprio[0]).float()[None])
    expected_tokens = alone.action_tokens[0].numpy()
    sockets = {}
    closes = []
    opened = contextlib.ExitStack()

    def robot():
        if "robot" not in sockets:
            sockets["robot"] = opened.enter_context(connect(server.uri, compression=None, max_size=None))
            assert "observation" in unpack(sockets["robot"].recv())
        return sockets["robot"]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(messages)
    def check(message):
        kind, payload = message
        if kind == "map":
            observation, with_good_images = payload
            if with_good_images:
                observation["images"] = {c: np.zeros((32, 32, 3), np.uint8) for c in CAMERAS}
            try:
                payload = pack(observation)
            except ValueError:
                return  # not sendable in the first place; the codec has its own tests
        socket = robot()
        socket.send(payload)
        try:
            reply = socket.recv(timeout=30)
        except ConnectionClosed as closed:
            closes.append(closed.rcvd.code)
            sockets.pop("robot").close()
            return
        if isinstance(reply, bytes):
            assert unpack(reply)["actions"].shape == (model.config.action_chunk, model.config.action_dim)
        else:
            assert reply.startswith(("observation refused: ", "malformed message: ")) and len(reply) > 25, reply
            if reply.startswith("malformed message"):
                with pytest.raises(ConnectionClosed) as closed:
                    socket.recv(timeout=30)
                closes.append(closed.value.rcvd.code)
                sockets.pop("robot").close()
        # a second robot's fresh episode is untouched by whatever the first one sent
        with connect(server.uri, compression=None, max_size=None) as witness:
            unpack(witness.recv())
            witness.send(good)
            np.testing.assert_array_equal(unpack(witness.recv())["action_tokens"], expected_tokens)

    try:
        check()
        assert set(closes) <= {1007, 1009}, closes
        health = urllib.request.urlopen(f"http://127.0.0.1:{server.server.port}/healthz", timeout=10).read()
        assert b'"status": "ok"' in health
    finally:
        opened.close()
        server.stop()
