"""The running proxy: context, site, metrics endpoint and graceful shutdown, without the CLI.

Tests and other programs can run a proxy in-process with ``ProxyNode``; coap-proxy
(``coaplayers.programs.proxy``) only turns flags into a ``ProxyConfig`` and calls ``run``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from aiocoap import Message

from .._aiocoap import remember_local_multicast
from .accesslog import AccessLog
from .config import ProxyConfig
from .metrics import MetricsRegistry, MetricsServer
from .replicas import HealthMonitor
from .site import ProxySite
from .transport import (
    FastPathShell,
    ProxyContext,
    attach_fast_path,
    attach_screens,
    build_context,
    format_uri,
)


class ProxyNode:
    """One proxy instance. ``metrics`` is the registry Layer 1 adds its DTLS counters to."""

    def __init__(
        self, config: ProxyConfig, *, access_log: AccessLog | None = None,
        metrics: MetricsRegistry | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or MetricsRegistry()
        self.access_log = access_log or AccessLog(config.log_file)
        self.site = ProxySite(config, self.metrics, self.access_log)
        self.context: ProxyContext | None = None
        self.metrics_server: MetricsServer | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.health: HealthMonitor | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.fast_paths: list[FastPathShell] = []
        self._stopped = asyncio.Event()

    @property
    def bound_uris(self) -> list[str]:
        return self.context.bound_uris if self.context else []

    async def start(self) -> list[str]:
        """Bind everything; returns the listen URIs with real ports (port 0 resolved)."""
        remember_local_multicast()  # one ipaddress parse per answer less (as coap-server)
        self.site.hold_until_ready()  # the listeners answer before the rest exists
        self.context = await build_context(self.config, self.site, self.metrics)
        try:
            for scheme, host, port in self.context.bound:
                self.site.router.add_own_address(scheme, host, port)
            self.site.upstream_schemes = self.context.upstream_schemes
            self.site.upstream = self.context.upstream
            first = self.context.bound[0]
            self.site.self_name = format_uri(*first).split("://", 1)[1]
            for scheme, host, port in self.context.bound:
                if self.site.router.is_self(scheme, host, port) and any(
                    r.upstream.scheme == scheme and self.site.router.is_self(
                        scheme, r.upstream.host, r.upstream.port)
                    for r in self.config.routes
                ):
                    self.access_log.event(
                        "warning", message="a route points at this proxy itself; requests "
                        "on it end with 5.08 Hop Limit Reached")
                    break
            self._warn_about_forwarding()
            if self.config.fast_path:
                self.fast_paths = attach_fast_path(self.context, self.site)
            else:
                attach_screens(self.context, self.site)
            if self.site.router.sets:
                await self._start_health(self.context)
            if self.metrics.multiprocess:
                self._refresher = asyncio.get_running_loop().create_task(self._refresh())
            if self.config.metrics is not None:
                self.metrics_server = MetricsServer(self.metrics)
                self.metrics_address = await self.metrics_server.start(*self.config.metrics)
        except BaseException:
            if self.health is not None:
                await self.health.stop()
            await self.context.shutdown()
            raise
        self.site.ready()
        self.access_log.event(
            "start", listen=self.bound_uris, routes=[str(r) for r in self.config.routes],
            forward=self.config.forward, allow=list(self.config.allow),
            metrics=None if self.metrics_address is None else
            f"http://{format_uri('x', *self.metrics_address)[4:]}/metrics",
        )
        return self.bound_uris

    def _warn_about_forwarding(self) -> None:
        """Say at start what forward proxying may reach when it is wide open or shut."""
        if not self.config.forward:
            return
        allow = self.site.router.allow
        if allow.opens_everything:
            self.access_log.event(
                "warning", message="forward proxying is open to any upstream address (allow"
                " '*'): anyone who reaches this proxy can send from it to every host it"
                " reaches, except loopback, link-local, unspecified, multicast and its own"
                " addresses")
        elif not allow.rules and not self.config.routes:
            self.access_log.event(
                "warning", message="forward proxying reaches no upstream: Proxy-Uri and"
                " Proxy-Scheme requests are refused with 4.03 until --allow names some")

    async def _refresh(self) -> None:
        """A worker of several writes its function-read gauges and its counters' increments
        for the supervisor's scrape."""
        while True:
            self.metrics.refresh()
            await asyncio.sleep(0.5)

    async def _start_health(self, context: ProxyContext) -> None:
        """Probe the replica sets' members once (bounded) so routes work when we say ready,
        then on every health_interval."""
        pool = context.upstream

        async def send(message: Message, target: str) -> Message:
            request = await pool.request(("replica health", target), message, target)
            return await request.response

        self.health = HealthMonitor(
            list(self.site.router.sets.values()), send, interval=self.config.health_interval,
            events=self.access_log.event, metrics=self.metrics,
            resolve_every=max(self.config.resolve_ttl, self.config.health_interval),
        )
        await self.health.first_round(self.config.health_timeout)
        for s in self.site.router.sets.values():
            self.access_log.event("replica_set", route=s.route.match, healthy=s.healthy,
                                  members={m.key: m.replica for m in s.members.values()
                                           if m.up})
        self.health.start()

    async def stop(self) -> bool:
        """Refuse new requests (5.03), let in-flight ones finish within the grace period, close.

        Returns whether everything in flight finished in time.
        """
        if self._stopped.is_set():
            return True
        self.site.begin_drain()
        finished = await self.site.wait_idle(self.config.shutdown_grace)
        self.access_log.event("stop", in_flight_left=self.site.in_flight.count,
                              clean=finished)
        if self.health is not None:
            await self.health.stop()
        if self._refresher is not None:
            self._refresher.cancel()
            self.metrics.refresh()  # the last counts reach the supervisor's scrape
        if self.metrics_server is not None:
            await self.metrics_server.close()
        for fast in self.fast_paths:
            await fast.shutdown()
        if self.context is not None:
            await self.context.shutdown()
        if self.site.http_upstream is not None:
            await self.site.http_upstream.close()
        self._stopped.set()
        return finished

    async def run(self, on_ready: Callable[[ProxyNode], None] | None = None) -> None:
        """Start, serve until SIGINT or SIGTERM, then stop gracefully."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            if on_ready is not None:
                on_ready(self)
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()
            logging.getLogger("coaplayers.proxy").debug("stopped")
