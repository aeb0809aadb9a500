"""Bridge a long-running blocking function on its own thread into an awaitable.

The pipeline's intake and sink loops are threads (fsync and Parquet encoding must not block the
event loop). They are *daemon* threads rather than ``asyncio.to_thread`` workers on purpose: when
the shutdown deadline passes, the process must be able to exit even if a flush is still running.
That is safe because an interrupted flush is indistinguishable from a crash, which the log and
checkpoint protocol already recover from.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


async def run_in_thread(name: str, target: Callable[[], T]) -> T:
    """Run ``target`` on a new daemon thread named ``name`` and await its result.

    Cancelling the awaiting task does not stop the thread: callers signal their loops to stop
    (each loop takes a ``threading.Event``) before or when cancelling.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def runner() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = target()
        except BaseException as exc:  # handed to the awaiting task, which decides
            error = exc
        # RuntimeError: the event loop is already closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, future, result, error)

    threading.Thread(target=runner, name=name, daemon=True).start()
    return await future
