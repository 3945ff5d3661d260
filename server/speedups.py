"""Per-request work coap-server saves inside aiocoap: the patch itself lives in the aiocoap
seam, :func:`coaplayers._aiocoap.remember_local_multicast`."""

from __future__ import annotations

from coaplayers._aiocoap import remember_local_multicast

__all__ = ["remember_local_multicast"]
