"""`kvla serve`: a policy server in openpi's protocol (a websocket; the metadata as the first binary
frame; one msgpack-numpy observation per request, a map with "actions" back; errors as text
frames), so robot code using `openpi-client` talks to it unchanged.

Every connection is one robot's episode: its own cache and bookkeeping (a session), created on
connect, freed on close or after `idle_timeout_s` without a request. An observation with
`reset=True` starts a new episode on an open connection (openpi's client.reset() sends nothing).
Steps run on one engine thread, so the event loop keeps answering pings, /healthz and other
robots while the model computes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import http
import json
import logging
import time
from dataclasses import dataclass

from kvla.model.inputs import InputError
from kvla.serve.protocol import DecodeLimits, ProtocolError, pack, unpack
from kvla.serve.schema import ObservationSchema

log = logging.getLogger("kvla.serve")

# websocket close codes
CLOSE_GOING_AWAY, CLOSE_UNSUPPORTED, CLOSE_INVALID, CLOSE_INTERNAL, CLOSE_RESTART, CLOSE_TRY_LATER = (
    1001, 1003, 1007, 1011, 1012, 1013)


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # clients must send `Authorization: Api-Key <key>`
    max_sessions: int = 64
    idle_timeout_s: float = 300.0
    max_message_bytes: int = 16 << 20
    shutdown_timeout_s: float = 30.0


class Session:
    """One robot's connection: its episode state and bookkeeping."""

    def __init__(self, number: int, remote: str, state):
        self.number, self.remote, self.state = number, remote, state
        self.steps = 0
        self.last_total_ms: float | None = None


class PolicyServer:
    def __init__(self, policy, schema: ObservationSchema, metadata: dict, settings: ServeSettings = ServeSettings()):
        self.policy, self.schema, self.settings = policy, schema, settings
        self.metadata = {**metadata, "observation": schema.describe(),
                         "reset": "send reset=True in an observation to start a new episode with it",
                         "limits": {"max_message_bytes": settings.max_message_bytes,
                                    "max_sessions": settings.max_sessions, "idle_timeout_s": settings.idle_timeout_s}}
        self.limits = DecodeLimits(max_message_bytes=settings.max_message_bytes)
        self.sessions: dict[int, Session] = {}
        self.opened = 0
        self.in_flight = 0
        self.draining = False
        self.port: int | None = None
        self._engine = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvla-engine")
        self._make_state = type(policy.state)
        self._idle = asyncio.Event()

    # HTTP, before the websocket upgrade: health, the API key, the session limit
    def _process_request(self, connection, request):
        if request.path == "/healthz":
            status = http.HTTPStatus.SERVICE_UNAVAILABLE if self.draining else http.HTTPStatus.OK
            body = {"status": "draining" if self.draining else "ok", "sessions": len(self.sessions),
                    "in_flight": self.in_flight}
            return connection.respond(status, json.dumps(body) + "\n")
        if self.settings.api_key is not None:
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Api-Key {self.settings.api_key}".encode()):
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        if self.draining:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down\n")
        if len(self.sessions) >= self.settings.max_sessions:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"{self.settings.max_sessions} sessions open; try again later\n")
        return None

    def _step(self, session: Session, observation) -> dict:
        """On the engine thread: one control step of this session's episode."""
        started = time.perf_counter()
        policy = self.policy
        if observation.reset:
            session.state.reset()
        policy.state = session.state  # the policy object is shared; the episode is the session's
        out = policy.step(observation.images, observation.text_ids, observation.proprio)
        config = policy.model.config
        response = {
            "actions": out.actions[0].reshape(config.action_chunk, config.action_dim).float().numpy(),
            "action_tokens": out.action_tokens[0].numpy(),
            "episode_step": int(session.state.step) - 1,
            "policy_timing": {"vision_ms": out.vision_ms, "select_ms": out.select_ms,
                              "prefill_ms": out.prefill_ms, "decode_ms": out.decode_ms},
        }
        if hasattr(out, "reuse_ratio"):
            response["reuse_ratio"] = float(out.reuse_ratio)
        response["server_timing"] = {"infer_ms": (time.perf_counter() - started) * 1e3}
        return response

    async def _handle(self, websocket):
        self.opened += 1
        session = Session(self.opened, str(websocket.remote_address), self._make_state())
        self.sessions[session.number] = session
        try:
            await websocket.send(pack(self.metadata))
            while True:
                try:
                    message = await asyncio.wait_for(websocket.recv(), self.settings.idle_timeout_s)
                except asyncio.TimeoutError:
                    await websocket.close(CLOSE_GOING_AWAY, "idle timeout")
                    return
                received = time.perf_counter()
                if self.draining:
                    await websocket.send("server shutting down")
                    await websocket.close(CLOSE_RESTART, "server shutting down")
                    return
                if isinstance(message, str):
                    await websocket.send("expected a binary msgpack frame, got a text frame")
                    await websocket.close(CLOSE_UNSUPPORTED, "text frame")
                    return
                try:
                    observation = self.schema.parse(unpack(message, self.limits))
                except ProtocolError as error:
                    await websocket.send(f"malformed message: {error}")
                    await websocket.close(CLOSE_INVALID, "malformed message")
                    return
                except InputError as error:  # the robot can correct it; its episode is untouched
                    await websocket.send(f"observation refused: {error}")
                    continue
                try:
                    response = await self._run(session, observation)
                except StepRefused as refusal:
                    await websocket.send(f"observation refused: {refusal}")
                    continue
                except StepFailed as failure:
                    await websocket.send(f"internal error: {failure}; the episode was reset")
                    await websocket.close(CLOSE_INTERNAL, "internal error")
                    return
                if session.last_total_ms is not None:
                    response["server_timing"]["prev_total_ms"] = session.last_total_ms
                await websocket.send(pack(response))
                session.last_total_ms = (time.perf_counter() - received) * 1e3
        except Exception as error:  # a dropped connection ends only this robot's session
            if type(error).__module__.startswith("websockets"):
                return
            raise
        finally:
            self.sessions.pop(session.number, None)
            session.state.reset()  # free the cache now, not when the last reference goes

    async def _run(self, session: Session, observation) -> dict:
        from kvla.engine.history import HistoryError

        loop = asyncio.get_running_loop()
        self.in_flight += 1
        self._idle.clear()
        try:
            response = await loop.run_in_executor(self._engine, self._step, session, observation)
        except (InputError, HistoryError) as error:  # e.g. a changed instruction within a history episode
            raise StepRefused(f"{error} (send reset=True to start a new episode)") from None
        except Exception as error:
            log.exception("step failed for session %d", session.number)
            session.state.reset()
            raise StepFailed(type(error).__name__) from None
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        session.steps += 1
        return response

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set, then drain: /healthz answers 503, new connections are refused,
        steps in flight finish and are answered, and the server closes."""
        from websockets.asyncio.server import serve

        async with serve(self._handle, self.settings.host, self.settings.port, compression=None,
                         max_size=self.settings.max_message_bytes, process_request=self._process_request) as server:
            self.port = server.sockets[0].getsockname()[1]
            if ready is not None:
                ready.set()
            await stop.wait()
            self.draining = True
            if self.in_flight:
                try:
                    await asyncio.wait_for(self._idle.wait(), self.settings.shutdown_timeout_s)
                except asyncio.TimeoutError:
                    log.warning("shutdown: %d steps still running after %.0f s", self.in_flight,
                                self.settings.shutdown_timeout_s)
            server.close()
            await server.wait_closed()
        self._engine.shutdown(wait=True)


class StepRefused(Exception):
    """The observation cannot be used in this episode; the robot may correct it."""


class StepFailed(Exception):
    """The step failed inside the server; the session's episode was reset."""


def build_server(checkpoint, method: str, settings: ServeSettings, max_image_side: int = 1024) -> PolicyServer:
    """A server for a trained checkpoint (single-frame or history VLA) and one method."""
    import dataclasses

    from kvla.model.reference import InstructionTokenizer, checkpoint_cameras
    from kvla.model.vla import VLAModel
    from kvla.testbed.evaluate import make_policies

    model = VLAModel.from_pretrained(checkpoint).eval()
    policy = make_policies(checkpoint, model, [method])[0]
    schema = ObservationSchema(model.config, checkpoint_cameras(checkpoint), InstructionTokenizer.load(checkpoint),
                               max_image_side=max_image_side)
    metadata = {"server": "kvla", "protocol": "openpi websocket, msgpack-numpy", "checkpoint": str(checkpoint),
                "method": policy.method.name, "method_settings": dataclasses.asdict(policy.method),
                "model": dataclasses.asdict(model.config),
                "action": {"shape": [model.config.action_chunk, model.config.action_dim], "dtype": "float32",
                           "range": [-1.0, 1.0]},
                # a history VLA sees a frame every frame_stride env steps: execute that many actions of a chunk
                "actions_per_observation": getattr(getattr(policy, "history", None), "frame_stride",
                                                   model.config.action_chunk)}
    return PolicyServer(policy, schema, metadata, settings)


def run_until_signalled(server: PolicyServer) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully."""
    import signal

    async def main():
        stop, ready = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(server.serve(stop, ready))
        await ready.wait()
        log.warning("kvla serve: ws://%s:%d (health: http://%s:%d/healthz)", server.settings.host, server.port,
                    server.settings.host, server.port)
        await task

    asyncio.run(main())
