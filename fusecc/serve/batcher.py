"""Model-aware dynamic batching: requests for any model of the fleet wait at most ``max_delay`` for others, up to
``max_batch`` rows, and ONE batch serves them all (:meth:`ServedFleet.run` decides how it runs).

One worker thread runs the batches and, between them, the hot swaps, in arrival order: a request that came before a
swap of its model is answered by the old weights, one that came after by the new ones, none by a mix. The queue is
bounded in rows; a full queue refuses at once (:class:`Overloaded`, HTTP 503) instead of growing. If a batch fails,
each of its requests is run alone, so one bad request fails only itself.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Deque, List, Mapping, Optional, Tuple

from torch import Tensor

from .fleet import Plan, Request, ServedFleet

__all__ = ["DynamicBatcher", "Overloaded", "ShuttingDown"]

log = logging.getLogger("fusecc.serve")


class Overloaded(RuntimeError):
    """The queue is full: try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(RuntimeError):
    """The batcher no longer takes requests (the server is draining)."""


class _Swap:
    def __init__(self, model: int, state_dict: Mapping[str, Tensor], future: Future) -> None:
        self.model, self.state_dict, self.future = model, state_dict, future


class DynamicBatcher:
    """Collects requests into batches and runs them on ``fleet`` in one background thread.

    Args:
        fleet: the :class:`ServedFleet`.
        max_batch: the most rows in a batch.
        max_delay: seconds the first request of a batch waits for more (0: run what is there).
        max_queue: the most rows waiting; beyond it :meth:`submit` raises :class:`Overloaded`.
        on_batch: called after each batch with (rows, requests, plan, seconds) (metrics).
    """

    def __init__(self, fleet: ServedFleet, max_batch: int = 32, max_delay: float = 0.005, max_queue: int = 1024,
                 on_batch: Optional[Callable[[int, int, Optional[Plan], float], None]] = None) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay < 0:
            raise ValueError(f"fusecc serve: need max_batch >= 1, max_queue >= 1, max_delay >= 0; got {max_batch}, "
                             f"{max_queue}, {max_delay}")
        self.fleet, self.max_batch, self.max_delay, self.max_queue = fleet, max_batch, max_delay, max_queue
        self.on_batch = on_batch
        self._q: Deque[Any] = collections.deque()
        self._rows = 0
        self._cv = threading.Condition()
        self._closed = False
        self._busy_since: Optional[float] = None
        self._seconds_per_row = 0.0  # a running estimate for Retry-After
        self._thread = threading.Thread(target=self._loop, name="fusecc-batcher", daemon=True)
        self._thread.start()

    @property
    def queued_rows(self) -> int:
        return self._rows

    def submit(self, request: Request) -> "Future[Request]":
        """Queue a request; the future resolves to it with ``outputs`` set (or to the exception it raised)."""
        fut: "Future[Request]" = Future()
        with self._cv:
            if self._closed:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            if self._rows + request.rows > self.max_queue:
                wait = max(0.05, self._rows * self._seconds_per_row)
                raise Overloaded(f"the queue is full ({self._rows} rows waiting, at most {self.max_queue}); retry "
                                 f"in {wait:.2f} s", retry_after=wait)
            self._q.append((request, fut, time.perf_counter()))
            self._rows += request.rows
            self._cv.notify()
        return fut

    def swap(self, model: int, state_dict: Mapping[str, Tensor]) -> "Future[None]":
        """New weights for ``model`` once the requests queued before this call are served."""
        fut: "Future[None]" = Future()
        with self._cv:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            self._q.append(_Swap(model, state_dict, fut))
            self._cv.notify()
        return fut

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop taking requests; with ``drain`` serve those queued, else fail them with ShuttingDown."""
        with self._cv:
            self._closed = True
            if not drain:
                while self._q:
                    item = self._q.popleft()
                    fut = item.future if isinstance(item, _Swap) else item[1]
                    if not fut.done():
                        fut.set_exception(ShuttingDown("the server shut down before this request ran"))
                self._rows = 0
            self._cv.notify_all()
        self._thread.join(timeout)

    # ---------------------------------------------------------------------------------------------------- worker
    def _take(self) -> Tuple[List[Tuple[Request, Future, float]], Optional[_Swap]]:
        """Wait for work; return a batch (maybe empty) and the swap that ends it, if any. ([] , None): closed."""
        with self._cv:
            while not self._q:
                if self._closed:
                    return [], None
                self._cv.wait()
            head = self._q[0]
            if not isinstance(head, _Swap):
                deadline = head[2] + self.max_delay
                while not self._closed:  # wait for more rows until the deadline or a full batch
                    rows = 0
                    for item in self._q:
                        if isinstance(item, _Swap):
                            break
                        rows += item[0].rows
                    left = deadline - time.perf_counter()
                    if rows >= self.max_batch or left <= 0 or any(isinstance(i, _Swap) for i in self._q):
                        break
                    self._cv.wait(left)
            batch: List[Tuple[Request, Future, float]] = []
            rows = 0
            while self._q and not isinstance(self._q[0], _Swap):
                req = self._q[0][0]
                if batch and rows + req.rows > self.max_batch:
                    break
                item = self._q.popleft()
                self._rows -= req.rows
                rows += req.rows
                if item[1].set_running_or_notify_cancel():  # a cancelled request (client gone) is dropped
                    batch.append(item)
            swap = self._q.popleft() if not batch and self._q and isinstance(self._q[0], _Swap) else None
            return batch, swap

    def _loop(self) -> None:
        while True:
            batch, swap = self._take()
            if swap is not None:
                try:
                    self.fleet.load_model_state_dict(swap.model, swap.state_dict)
                    swap.future.set_result(None)
                except BaseException as e:  # noqa: BLE001 (handed to the caller)
                    swap.future.set_exception(e)
                continue
            if not batch:
                with self._cv:
                    if self._closed and not self._q:
                        return
                continue
            self._run(batch)

    def _run(self, batch: List[Tuple[Request, Future, float]]) -> None:
        t0 = time.perf_counter()
        reqs = [r for r, _, _ in batch]
        rows = sum(r.rows for r in reqs)
        plan: Optional[Plan] = None
        try:
            plan = self.fleet.run(reqs)
            for r, fut, _ in batch:
                fut.set_result(r)
        except Exception as e:  # noqa: BLE001
            if len(batch) == 1:
                batch[0][1].set_exception(e)
            else:  # one bad request must not fail the others: each alone
                log.warning("a batch of %d requests failed (%s: %s); running each alone", len(batch),
                            type(e).__name__, e)
                for r, fut, _ in batch:
                    try:
                        self.fleet.run([r])
                        fut.set_result(r)
                    except Exception as e1:  # noqa: BLE001
                        fut.set_exception(e1)
        dt = time.perf_counter() - t0
        self._seconds_per_row = 0.8 * self._seconds_per_row + 0.2 * dt / max(rows, 1)
        if self.on_batch is not None:
            try:
                self.on_batch(rows, len(batch), plan, dt)
            except Exception:  # noqa: BLE001 (metrics never fail a batch)
                log.exception("metrics callback failed")
