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
    max_batch: int = 32  # requests of different robots stepped together (1: one at a time)
    max_wait_ms: float = 2.0  # how long a step waits for more requests to join its batch


class Session:
    """One robot's connection: its episode state and bookkeeping."""

    def __init__(self, number: int, remote: str, state):
        self.number, self.remote, self.state = number, remote, state
        self.steps = 0
        self.last_total_ms: float | None = None


@dataclass
class _Request:
    session: Session
    observation: object  # schema.Observation
    future: asyncio.Future
    queued: float  # perf_counter when it joined the queue


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
        self._pending: set[asyncio.Future] = set()  # the answers robots are waiting for
        self._queue: asyncio.Queue | None = None
        if settings.max_batch < 1 or settings.max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {settings.max_batch}, "
                             f"{settings.max_wait_ms}")

    # HTTP, before the websocket upgrade: health, the API key, the session limit
    def _process_request(self, connection, request):
        if request.path == "/healthz":
            status = http.HTTPStatus.SERVICE_UNAVAILABLE if self.draining else http.HTTPStatus.OK
            body = {"status": "draining" if self.draining else "ok", "sessions": len(self.sessions),
                    "in_flight": self.in_flight}
            return connection.respond(status, json.dumps(body) + "\n")
        if self.settings.api_key is not None:
            sent = request.headers.get_all("Authorization")
            expected = f"Api-Key {self.settings.api_key}".encode("latin-1", "replace")
            if len(sent) != 1 or not hmac.compare_digest(sent[0].encode("latin-1", "replace"), expected):
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        if self.draining:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down\n")
        if len(self.sessions) >= self.settings.max_sessions:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"{self.settings.max_sessions} sessions open; try again later\n")
        return None

    def _response(self, out, session: Session) -> dict:
        config = self.policy.model.config
        response = {
            "actions": out.actions[0].reshape(config.action_chunk, config.action_dim).float().cpu().numpy(),
            "action_tokens": out.action_tokens[0].cpu().numpy(),
            "episode_step": int(session.state.step) - 1,
            "policy_timing": {"vision_ms": out.vision_ms, "select_ms": out.select_ms,
                              "prefill_ms": out.prefill_ms, "decode_ms": out.decode_ms},
        }
        if hasattr(out, "reuse_ratio"):
            response["reuse_ratio"] = float(out.reuse_ratio)
        return response

    def _step_batch(self, requests: list[_Request]) -> list:
        """On the engine thread: one control step of each request's episode, batched where the
        policy can batch episodes; per request a response or the exception that ended it."""
        import torch

        started = time.perf_counter()
        policy = self.policy
        for request in requests:
            if request.observation.reset:
                request.session.state.reset()
        results: dict[int, object] = {}
        history = getattr(policy, "history", None)
        if history is not None:  # a history episode longer than the model was trained on is refused
            for index, request in enumerate(requests):
                if request.session.state.step >= history.max_frames:
                    results[index] = InputError("reset", f"this episode has reached the history VLA's "
                                                         f"{history.max_frames} steps")
        runnable = [i for i in range(len(requests)) if i not in results]
        if len(runnable) > 1 and hasattr(policy, "step_episodes"):
            observations = [requests[i].observation for i in runnable]
            try:
                images = torch.cat([policy.model.policy_images(o.images) for o in observations])
                proprio = None if observations[0].proprio is None else torch.cat([o.proprio for o in observations])
                outs = policy.step_episodes([requests[i].session.state for i in runnable], images,
                                            torch.cat([o.text_ids for o in observations]), proprio)
                results.update({i: self._response(out, requests[i].session) for i, out in zip(runnable, outs)})
            except Exception as error:  # the episodes may be half-stepped: start them again
                log.exception("batched step of %d sessions failed", len(runnable))
                for i in runnable:
                    requests[i].session.state.reset()
                    results[i] = error
        else:
            for i in runnable:
                request = requests[i]
                policy.state = request.session.state  # the policy object is shared; the episode is the session's
                observation = request.observation
                try:
                    results[i] = self._response(policy.step(observation.images, observation.text_ids,
                                                            observation.proprio), request.session)
                except Exception as error:
                    results[i] = error
        infer_ms = (time.perf_counter() - started) * 1e3
        ordered = [results[i] for i in range(len(requests))]
        for request, result in zip(requests, ordered):
            if isinstance(result, dict):
                result["server_timing"] = {"infer_ms": infer_ms, "queue_ms": (started - request.queued) * 1e3,
                                           "batch_size": len(requests)}
        return ordered

    async def _batcher(self) -> None:
        """Takes the queued requests of different robots, up to max_batch, waiting at most
        max_wait_ms for more to join, and steps them on the engine thread."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + settings.max_wait_ms / 1e3
            while len(batch) < settings.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [r for r in batch if not r.future.done()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._engine, self._step_batch, batch)
            except Exception as error:  # never leave a robot waiting on a batch that failed
                log.exception("a batch of %d failed", len(batch))
                results = [error] * len(batch)
            for request, result in zip(batch, results):
                if request.future.done():
                    continue
                if isinstance(result, BaseException):
                    request.future.set_exception(result)
                else:
                    request.future.set_result(result)

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
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.add(future)
        self.in_flight += 1
        self._idle.clear()
        try:
            await self._queue.put(_Request(session, observation, future, time.perf_counter()))
            response = await future
        except InputError as error:  # e.g. a changed instruction within a history episode: nothing was stepped
            raise StepRefused(f"{error} (send reset=True to start a new episode)") from None
        except Exception as error:
            log.error("step failed for session %d: %r", session.number, error)
            session.state.reset()
            raise StepFailed(type(error).__name__) from None
        finally:
            self._pending.discard(future)
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        session.steps += 1
        return response

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set, then drain: /healthz answers 503, new connections are refused,
        steps in flight finish and are answered, and the server closes; steps still running after
        shutdown_timeout_s are answered with an error instead."""
        from websockets.asyncio.server import serve

        # max_queue 2: the protocol is lock-step, so a robot has no reason to queue more frames
        async with serve(self._handle, self.settings.host, self.settings.port, compression=None,
                         max_size=self.settings.max_message_bytes, max_queue=2,
                         process_request=self._process_request) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._queue = asyncio.Queue()
            batcher = asyncio.create_task(self._batcher())
            if ready is not None:
                ready.set()
            await stop.wait()
            self.draining = True
            if self.in_flight:
                try:
                    await asyncio.wait_for(self._idle.wait(), self.settings.shutdown_timeout_s)
                except asyncio.TimeoutError:  # answer the robots still waiting, so the handlers can end
                    log.warning("shutdown: %d steps still running after %.0f s; failing them", self.in_flight,
                                self.settings.shutdown_timeout_s)
                    for future in list(self._pending):
                        if not future.done():
                            future.set_exception(TimeoutError("the server shut down before this step finished"))
            server.close()
            await server.wait_closed()
            batcher.cancel()
        self._engine.shutdown(wait=False, cancel_futures=True)  # a step still running ends on its own


class StepRefused(Exception):
    """The observation cannot be used in this episode; the robot may correct it."""


class StepFailed(Exception):
    """The step failed inside the server; the session's episode was reset."""


def build_server(checkpoint, method: str, settings: ServeSettings, max_image_side: int = 1024,
                 device: str = "cpu", dtype: str = "float32") -> PolicyServer:
    """A server for a trained checkpoint (single-frame or history VLA) and one method, its model on
    `device` in `dtype` (float32 or bfloat16)."""
    import dataclasses

    import torch

    from kvla.model.reference import InstructionTokenizer, checkpoint_cameras
    from kvla.model.vla import VLAModel
    from kvla.testbed.evaluate import make_policies

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, not {dtype!r}")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but CUDA is not available on this machine")
    model = VLAModel.from_pretrained(checkpoint).to(device=device, dtype=dtypes[dtype]).eval()
    policy = make_policies(checkpoint, model, [method])[0]
    schema = ObservationSchema(model.config, checkpoint_cameras(checkpoint), InstructionTokenizer.load(checkpoint),
                               max_image_side=max_image_side)
    metadata = {"server": "kvla", "protocol": "openpi websocket, msgpack-numpy", "checkpoint": str(checkpoint),
                "method": policy.method.name, "method_settings": dataclasses.asdict(policy.method),
                "model": dataclasses.asdict(model.config), "device": str(device), "dtype": dtype,
                "action": {"shape": [model.config.action_chunk, model.config.action_dim], "dtype": "float32",
                           "range": [-1.0, 1.0]},
                # a history VLA sees a frame every frame_stride env steps: execute that many actions of a chunk
                "actions_per_observation": getattr(getattr(policy, "history", None), "frame_stride",
                                                   model.config.action_chunk)}
    return PolicyServer(policy, schema, metadata, settings)


class BackgroundServer:
    """A PolicyServer serving from a thread with its own event loop (tests, load tests, notebooks);
    `port` 0 in its settings picks a free one. stop() drains it as a signal would."""

    def __init__(self, server: PolicyServer, start_timeout_s: float = 60.0):
        import threading

        self.server = server
        self.error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kvla-serve", daemon=True)
        self.thread.start()
        if not self._started.wait(start_timeout_s):
            raise RuntimeError(f"the server did not start within {start_timeout_s:.0f} s")
        if self.error is not None:
            raise RuntimeError(f"the server failed to start: {self.error!r}") from self.error
        self.uri = f"ws://127.0.0.1:{server.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.stop_event = asyncio.Event()

        async def main():
            ready = asyncio.Event()
            task = asyncio.create_task(self.server.serve(self.stop_event, ready))
            await asyncio.wait({task, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():  # it could not start: raise here, so the error is set before anyone is woken
                await task
            self._started.set()
            await task

        try:
            self.loop.run_until_complete(main())
        except BaseException as error:  # handed to the thread that started the server
            self.error = error
            self._started.set()

    def request_stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)

    def stop(self, timeout_s: float = 60.0) -> None:
        self.request_stop()
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise RuntimeError(f"the server did not stop within {timeout_s:.0f} s")


def run_until_signalled(server: PolicyServer) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully."""
    import signal

    async def main():
        stop, ready = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(server.serve(stop, ready))
        await asyncio.wait({task, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # it failed to start (the port taken, ...): raise its error
        log.warning("kvla serve: ws://%s:%d (health: http://%s:%d/healthz)", server.settings.host, server.port,
                    server.settings.host, server.port)
        await task

    asyncio.run(main())
