"""Waiting on other processes in tests: they announce nothing to this one, so their logs, output files or
the batch system are polled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout_s``. It runs on a thread: it reads
    files or runs commands, which must not block the event loop the processes are watched from."""
    try:
        async with asyncio.timeout(timeout_s):
            while not await asyncio.to_thread(predicate):
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"after {timeout_s:g} s: {what}") from None


async def until_state(condition: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
    """Poll a condition on an in-process broker's state (a peer declared dead, a result counted), which no
    message announces to the test. On the loop, not a thread: the broker's store is the loop's alone."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() >= deadline:
            raise AssertionError(f"after {timeout_s:g} s: {what}")
        await asyncio.sleep(0.02)
