"""Fixtures of the OSCORE tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiocoap
import pytest


@pytest.fixture
async def client() -> AsyncIterator[aiocoap.Context]:
    """An aiocoap client context on a real UDP socket (ephemeral port)."""
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield ctx
    finally:
        await ctx.shutdown()
