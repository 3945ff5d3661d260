"""The coap-proxy command: --help, a TOML configuration, flags over the file, refusals."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import aiocoap
from aiocoap import GET, Message

from coaplayers.proxy.site import client_identity
from tests.conftest import run_program

from .conftest import PROXY, Running, http_get, metric, start_proxy


async def test_help_shows_flags_and_examples() -> None:
    rc, out, _ = await run_program(PROXY, "--help", timeout=20)
    text = out.decode()
    assert rc == 0
    for flag in ("--listen", "--route", "--forward", "--no-forward", "--config", "--metrics",
                 "--rate-limit", "--log-file", "--log-exchanges", "--no-log-exchanges",
                 "--resolve-ttl", "--upstream-credentials", "examples:"):
        assert flag in text, flag


async def test_config_file_with_flag_override(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    log = tmp_path / "from-file.jsonl"
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(
        'listen = ["coap://127.0.0.1:0"]\n'
        "forward = false\n"
        'allow = ["127.0.0.1"]\n'
        'metrics = "127.0.0.1:0"\n'
        f'log_file = "{log}"\n'
        f'[routes]\n"/file" = "coap://{origin.hostport}"\n'
    )
    # --log-file from start_proxy wins over the file's log_file; --forward over forward=false.
    proxies.append(proxy := await start_proxy(tmp_path, "--config", str(cfg), "--forward"))
    assert proxy.listen[0].startswith("coap://127.0.0.1:") and proxy.port != 0
    assert proxy.metrics is not None
    r = await asyncio.wait_for(client.request(
        Message(code=GET, uri=f"coap://{proxy.hostport}/file/a")).response, 10)
    assert json.loads(r.payload)["path"] == ["file", "a"]
    m = Message(code=GET, uri=f"coap://{proxy.hostport}/")
    m.opt.proxy_uri = f"coap://{origin.hostport}/fwd"
    r = await asyncio.wait_for(client.request(m).response, 10)
    assert r.code == aiocoap.CONTENT
    assert metric(await http_get(proxy.metrics), 'coap_proxy_requests_total{kind="reverse"}') == 1
    assert not log.exists()
    assert len([e for e in proxy.log_lines() if e["event"] == "exchange"]) == 2


async def test_exchange_lines_can_be_turned_off(
    tmp_path: Path, origin: Running, proxies: list[Running], client: aiocoap.Context
) -> None:
    """log_exchanges = false: no exchange lines, the events and the metrics stay."""
    cfg = tmp_path / "quiet.toml"
    cfg.write_text('listen = ["coap://127.0.0.1:0"]\nlog_exchanges = false\n')
    proxies.append(proxy := await start_proxy(tmp_path, "--config", str(cfg),
                                              "--metrics", "127.0.0.1:0"))
    assert proxy.metrics is not None
    for _ in range(2):
        m = Message(code=GET, uri=f"coap://{proxy.hostport}/")
        m.opt.proxy_uri = f"coap://{origin.hostport}/fwd"
        r = await asyncio.wait_for(client.request(m).response, 10)
        assert r.code == aiocoap.CONTENT
    text = await http_get(proxy.metrics)
    assert metric(text, 'coap_proxy_requests_total{kind="forward"}') == 2
    assert metric(text, 'coap_proxy_responses_total{code="2.05"}') == 2
    events = [e["event"] for e in proxy.log_lines()]
    assert "start" in events and "exchange" not in events
    # The flag wins over the file, as every flag does.
    proxies.append(loud := await start_proxy(tmp_path, "--config", str(cfg), "--log-exchanges"))
    m = Message(code=GET, uri=f"coap://{loud.hostport}/")
    m.opt.proxy_uri = f"coap://{origin.hostport}/fwd"
    assert (await asyncio.wait_for(client.request(m).response, 10)).code == aiocoap.CONTENT
    assert [e["event"] for e in loud.log_lines()].count("exchange") == 1


async def test_bad_configuration_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    rc, _, err = await run_program(PROXY, "--route", "nonsense", timeout=20)
    assert rc == 2 and b"NAME_OR_PREFIX=UPSTREAM_URI" in err
    rc, _, err = await run_program(PROXY, "--listen", "coaps://127.0.0.1:0", timeout=20)
    assert rc == 2 and b"coaps://" in err and b"needs Layer 1 credentials" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = 5\n")
    rc, _, err = await run_program(PROXY, "--config", str(bad), timeout=20)
    assert rc == 2 and b"listen" in err


def test_identity_hook_reads_layer1_claims() -> None:
    claim = SimpleNamespace(identity=b"device-7", layer=1)
    remote = SimpleNamespace(authenticated_claims=[claim], hostinfo="x")
    assert client_identity(SimpleNamespace(remote=remote)) == "device-7"  # type: ignore[arg-type]
    plain = SimpleNamespace(remote=SimpleNamespace(hostinfo="127.0.0.1:1"))
    assert client_identity(plain) is None  # type: ignore[arg-type]
