"""A node's background tasks: the relay, the topology watch, the invalidation listeners, the feed
tailer... Each runs until the node stops it; none may end unseen.

A task that fails (an exception it did not handle: a bug, a library's surprise) leaves the node
serving without it: no relay, a topology it no longer follows, a shard's invalidations unheard. It
is logged at once (critical, with its traceback) and `broken` is set: the node process drains and
exits 1, and its supervisor (`crs serve`'s parent, or Kubernetes) starts a fresh one. Restarting the
task in place would hide the bug and could repeat it in a tight loop; a fresh process starts from a
known state. A task that returns has finished its work (the read route without a replica).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Final

log = logging.getLogger("crs.node")

STOP_SECONDS: Final = 2.0   # stop(): how long the tasks get to end once cancelled


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.broken = asyncio.Event()   # set when a task failed

    def start(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._ended)
        self._tasks.append(task)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled():
            return
        exc = task.exception()
        if exc is None:   # it returned: it had nothing (more) to do (the read route without a replica)
            return
        log.critical("background task failed; the node stops so that a fresh one takes its place",
                     extra={"task": task.get_name(), "error": type(exc).__name__}, exc_info=exc)
        self.broken.set()

    def stopping(self) -> None:
        """The node is stopping: a task that ends from now on is no fault."""
        self._stopping = True

    async def stop(self) -> None:
        """Cancel every task and wait up to STOP_SECONDS for them to end."""
        self.stopping()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        done, stuck = await asyncio.wait(tasks, timeout=STOP_SECONDS)
        for task in done:
            if not task.cancelled():
                task.exception()   # retrieved: one that failed was logged when it failed
        for task in stuck:   # asyncpg cancelling a query on a database that does not answer, or a bug
            log.warning("background task still running after its cancel; stopping without it",
                        extra={"task": task.get_name(), "coroutine": repr(task.get_coro()), "waited_s": STOP_SECONDS})
