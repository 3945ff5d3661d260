"""Drive a rendering coroutine at once, and give it a task only if it has to wait.

aiocoap's ``run_driving_pipe`` starts every rendering in a task of its own. A Layer 0
request needs two of them on the server (the outer answer, which waits for the inner one, and
the inner rendering), although most resources answer without ever waiting: each task costs a
creation, a trip through the event loop and, for the outer one, the latency of those trips.
:func:`run_driving_pipe_eagerly` runs the coroutine right away, as Python 3.12's eager task
factory would (this stack runs on 3.11, and a task factory would change every task of the
program); only a coroutine that suspends continues in a task, which resumes it exactly as an
asyncio task would. Written here because neither asyncio 3.11 nor aiocoap has it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from aiocoap.pipe import Pipe


def run_driving_pipe_eagerly(pipe: Pipe, coroutine: Coroutine[Any, Any, Any],
                             name: str | None = None) -> None:
    """As ``aiocoap.pipe.run_driving_pipe(pipe, coroutine, name)``: an exception the coroutine
    raises ends the pipe with it, and the pipe's loss of interest cancels the coroutine; but
    the coroutine starts before this returns, and a task exists only once it waits."""
    try:
        waiting = coroutine.send(None)
    except StopIteration:
        return
    except Exception as exc:
        pipe.add_exception(exc)
        return
    driven = _Suspended(pipe, coroutine, waiting)
    task = asyncio.get_running_loop().create_task(driven.resume(), name=name)
    task.add_done_callback(driven.done)
    pipe.on_interest_end(task.cancel)


class _Suspended:
    """A coroutine that yielded ``waiting`` (a future, or None for a bare yield), stepped on
    the way ``asyncio.Task`` steps one: resumed once the future is done; on cancellation the
    future is cancelled and ``CancelledError`` thrown in."""

    def __init__(self, pipe: Pipe, coroutine: Coroutine[Any, Any, Any], waiting: Any) -> None:
        self.pipe = pipe
        self.coroutine = coroutine
        self.waiting = waiting
        self.started = False

    async def resume(self) -> None:
        self.started = True
        coroutine = self.coroutine
        while True:
            waiting = self.waiting
            try:
                if waiting is None:
                    await asyncio.sleep(0)
                else:
                    waiting._asyncio_future_blocking = False
                    if not waiting.done():
                        await asyncio.wait((waiting,))
                step: Any = coroutine.send
                arg: Any = None
            except asyncio.CancelledError as cancelled:
                if waiting is not None:
                    waiting.cancel()
                step, arg = coroutine.throw, cancelled
            try:
                self.waiting = step(arg)
            except StopIteration:
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.pipe.add_exception(exc)
                return

    def done(self, task: asyncio.Task[None]) -> None:
        """A task cancelled before its first step never ran :meth:`resume`: cancel the
        coroutine here, as a task cancelled while it waited would."""
        if self.started or not task.cancelled():
            return
        if self.waiting is not None:
            self.waiting.cancel()
        try:
            self.coroutine.throw(asyncio.CancelledError())
        except BaseException:  # CancelledError, or whatever it ended with (nobody listens)
            return
        self.coroutine.close()  # it went on waiting: nothing will resume it


__all__ = ["run_driving_pipe_eagerly"]
