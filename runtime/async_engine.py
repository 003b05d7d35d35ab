"""The engine loop on its own thread, beside the HTTP event loop.

Every engine call happens under one lock; the loop thread holds it for one step at a time, so
request handlers (run via asyncio.to_thread) slip in between steps and the event loop itself
never waits for the model. Outputs travel back to their stream's asyncio.Queue through
call_soon_threadsafe; a stream holds one HTTP request's engine requests (its n choices of each of
its prompts). A step that raises fails only the requests in that step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from quantkit.shards import return_free_memory_to_the_os

from .engine import LLMEngine, RequestOutput
from .sampling import SamplingParams

log = logging.getLogger("quantkit.serve")


class EngineFailure(RuntimeError):
    """The engine failed while computing this request; other requests continue."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[list[RequestOutput], float], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # metrics hook: (outputs, step seconds)
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._stopping = False
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending_aborts: list[int] = []  # list.append/pop are atomic under the GIL
        self._busy = False  # ran a step since the engine last went idle
        self._thread = threading.Thread(target=self._run, name="quantkit-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._work.set()
        self._thread.join(timeout=10)

    async def add(self, requests: list[tuple[str | list[int], SamplingParams]]) -> RequestStream:
        """Queue requests, all or none (ValueError / QueueFull propagate); iterate the stream for
        their outputs, interleaved as the steps produce them."""
        stream = RequestStream(self)

        def add() -> None:
            with self._lock:
                try:
                    for prompt, params in requests:
                        rid = self.engine.add_request(prompt, params)
                        stream.request_ids.append(rid)
                        self._streams[rid] = (stream.loop, stream.queue)
                except BaseException:
                    for rid in stream.request_ids:
                        self._streams.pop(rid, None)
                        self.engine.abort(rid)
                    raise
                stream.unfinished = set(stream.request_ids)
            self._work.set()

        await asyncio.to_thread(add)
        return stream

    def abort_nowait(self, request_id: int) -> None:
        """Abort from anywhere, without waiting (safe inside a cancelled task's cleanup)."""
        self._pending_aborts.append(request_id)
        self._work.set()

    def _abort_pending(self) -> None:
        while self._pending_aborts:
            rid = self._pending_aborts.pop()
            self._streams.pop(rid, None)
            self.engine.abort(rid)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._iterate()
            except Exception:  # noqa: BLE001 - keep the loop alive whatever a hook does
                log.exception("engine loop iteration failed")

    def _iterate(self) -> None:
        if self._pending_aborts:
            with self._lock:
                self._abort_pending()
        if not self.engine.has_unfinished():
            if self._busy:
                # Steps of changing batch shapes leave freed tensors as heap fragments that glibc
                # keeps resident: the server's RSS crept up ~20 MiB per burst of 64 streams
                # (BENCHMARKS.md, "Abuse"). Going idle hands them back (ctypes drops the GIL).
                self._busy = False
                return_free_memory_to_the_os()
            self._work.wait(0.05)
            self._work.clear()
            return
        self._busy = True
        with self._lock:
            start = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - one bad batch must not stop the server
                log.exception("engine step failed")
                self._fail_running(e)
                return
            elapsed = time.perf_counter() - start
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target:
                    target[0].call_soon_threadsafe(target[1].put_nowait, out)
                if out.finished:
                    self._streams.pop(out.request_id, None)
        if self.on_step:
            self.on_step(outputs, elapsed)

    def _fail_running(self, error: Exception) -> None:
        """Abort the running set (the failed step's sequences) and tell every client whose request is gone."""
        for seq in list(self.engine.scheduler.running):
            self.engine.abort(seq.seq_id)
        failure = EngineFailure(f"the engine failed on this request: {error}")
        for rid in [r for r in self._streams if r not in self.engine.sequences]:
            loop, queue = self._streams.pop(rid)
            loop.call_soon_threadsafe(queue.put_nowait, failure)


_CANCELLED = object()  # what a cancelled stream's reader wakes up to


class RequestStream:
    """The outputs of one or more requests: each request's in order, the last with finished=True;
    the stream ends when all have finished. cancel() if you stop reading."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_ids: list[int] = []
        self.unfinished: set[int] = set()
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if item is _CANCELLED:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            self.cancel()  # the failed request is gone; its siblings are not
            raise item
        if item.finished:
            self.unfinished.discard(item.request_id)
            self.finished = not self.unfinished
        return item

    def cancel(self) -> None:
        """Call on the stream's event loop: a reader waiting for the next output stops too."""
        if not self.finished:
            self.finished = True
            for rid in self.unfinished:
                self.engine.abort_nowait(rid)
            self.queue.put_nowait(_CANCELLED)
