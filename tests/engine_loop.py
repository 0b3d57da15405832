"""Closing a vLLM engine that lives on a test module's own event loop."""

from __future__ import annotations

import asyncio


def close_engine(loop: asyncio.AbstractEventLoop, engine) -> None:
    """``engine.close()``, then cancel what is left on the loop: vLLM's input-stream readers of
    aborted sessions would otherwise outlive the module and warn at interpreter exit."""
    loop.run_until_complete(engine.close())

    async def drain() -> None:
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    loop.run_until_complete(drain())
