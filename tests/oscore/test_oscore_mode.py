"""The OSCORE mode keyed by a real Layer 0 handshake, with real processes (issue 5, must-show 2-4).

Every peer is its own process on loopback UDP, on ports the kernel picked: coap-server,
coap-proxy, coap-client, aiocoap's proxy and client programs, and the servers of
mode_peers.py. Keys come from ``coap-keys``. Each wait is bounded by a condition (a line
printed, an answer received), never by a sleep.

- Interop (must-show 2): aiocoap's stock OSCORE contexts, built from the exporter output and
  the parameters, talk to coap-server; coap-client talks to aiocoap's stock OSCORE server.
- Through aiocoap-proxy and through coap-proxy with Layer 1 PSK on the client hop
  (must-show 3): GET, a 3,000-byte POST echoed byte-identical, Observe with three
  notifications; what the proxy forwards never contains the request's or answer's plaintext.
- A captured OSCORE request sent again gets an unprotected 4.01 and is not executed; a server
  restart leads to exactly one new handshake (must-show 4).
- Layer 1 credentials do not authenticate at Layer 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from coaplayers import dtls, layer1
from coaplayers.layer0 import Layer0Client
from coaplayers.layer0_modes import OscoreModeRequester
from coaplayers.programs import config as cfg
from coaplayers_tools.relay import Direction, FaultRelay, read_capture

from ..conftest import free_udp_port, stop_process
from .support import aiocoap_proxy, udp_exchange

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
T = 20.0  # bound on any single wait


# ----------------------------------------------------------------------------- processes


async def _read_until(proc: asyncio.subprocess.Process, prefix: str, timeout: float) -> str:
    assert proc.stdout is not None
    seen: list[str] = []

    async def read() -> str:
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                raise RuntimeError(f"process exited ({await proc.wait()}) before {prefix!r}: "
                                   f"{seen}")
            line = raw.decode().strip()
            seen.append(line)
            if line.startswith(prefix):
                return line

    return await asyncio.wait_for(read(), timeout)


@contextlib.asynccontextmanager
async def running(*argv: str | Path, ready: str) -> AsyncIterator[list[str]]:
    """Start a program, wait (bounded) for the line starting with ``ready``; yields every
    ``listen``/``listening`` URI it printed up to then. Stopped on exit."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    uris: list[str] = []
    try:
        while True:
            line = await _read_until(proc, "", T)
            if line.startswith(("listen ", "listening ")):
                uris.append(line.split()[-1])
            if line.startswith(ready):
                break
        yield uris
    finally:
        await stop_process(proc)


async def run(*argv: str | Path, timeout: float = 40.0) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv), cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One coap-keys credential set for the module, plus the client's hop credentials file."""
    import subprocess

    folder = tmp_path_factory.mktemp("keys") / "k"
    subprocess.run([BIN / "coap-keys", folder], check=True, capture_output=True, timeout=30)
    hop1 = json.loads((folder / "client-hop.json").read_text())
    (folder / "hop.json").write_text(json.dumps({"coaps://127.0.0.1*": next(iter(hop1.values()))}))
    return folder


def coap_server(keys: Path, port: int = 0) -> contextlib.AbstractAsyncContextManager[list[str]]:
    return running(BIN / "coap-server", "--config", keys / "server.toml",
                   "--listen", f"coap://127.0.0.1:{port}", ready="listening")


def mode_peer(kind: str, keys: Path) -> contextlib.AbstractAsyncContextManager[list[str]]:
    return running(sys.executable, "-m", "tests.oscore.mode_peers", kind,
                   "--cert", keys / "server-e2e.pem", "--key", keys / "server-e2e.key",
                   "--ca", keys / "e2e-ca.pem", ready="listening")


def coap_proxy(*args: str | Path) -> contextlib.AbstractAsyncContextManager[list[str]]:
    allow = () if "--allow" in args else ("--allow", "127.0.0.1")  # the tests' servers
    return running(BIN / "coap-proxy", *args, *allow, ready="ready")


def e2e_cert_flags(keys: Path, cert: str = "client-e2e") -> list[str | Path]:
    return ["--layer0", "oscore", "--e2e-ca", keys / "e2e-ca.pem",
            "--e2e-cert", keys / f"{cert}.pem", "--e2e-key", keys / f"{cert}.key"]


def client_certificate(keys: Path) -> dtls.CertificateCredentials:
    cert = cfg.certificate_from(str(keys / "client-e2e.pem"), str(keys / "client-e2e.key"),
                                str(keys / "e2e-ca.pem"), what="--layer0")
    assert cert is not None
    return cert


def requester(ctx: layer1.LayeredContext, keys: Path, origin: str,
              proxy: str) -> OscoreModeRequester:
    """What coap-client --layer0 oscore -P PROXY uses, kept across requests."""
    return OscoreModeRequester(ctx, f"{origin}/", proxy, client_certificate(keys))


async def ask(r: OscoreModeRequester, code: Code, uri: str) -> aiocoap.Message:
    return await asyncio.wait_for(r.request(aiocoap.Message(code=code, uri=uri)).response, T)


@pytest.fixture
async def client_context() -> AsyncIterator[layer1.LayeredContext]:
    """The context coap-client builds (here without Layer 1 credentials: plain hops)."""
    ctx = await layer1.create_context(client_credentials=layer1.ClientCredentials())
    try:
        yield ctx
    finally:
        await ctx.shutdown()


# ------------------------------------------------------------------------ must-show 2


async def test_stock_aiocoap_client_with_exported_keys_talks_to_coap_server(
    keys: Path, tmp_path: Path, client_context: layer1.LayeredContext
) -> None:
    """Key through the documented exchange by hand (our Layer 0 channel, then the exporter),
    build aiocoap's own FilesystemSecurityContext from the result, and let the unmodified
    ``aiocoap-client`` program talk to coap-server with it."""
    async with coap_server(keys) as (origin,):
        channel = Layer0Client(client_context.context, origin, client_certificate(keys))
        try:
            answer = await asyncio.wait_for(
                channel.request(aiocoap.Message(code=Code.POST,
                                                uri_path=[".well-known", "atls-oscore"])).response,
                T,
            )
            assert answer.code == Code.CHANGED, answer
            assert answer.opt.content_format == 65001
            params = cbor2.loads(answer.payload)
            exported = channel.export_keying_material(b"atls-oscore", 32, None)
        finally:
            await channel.close()
        # a 1-byte client ID while the server holds fewer than 64 contexts
        assert set(params) == {7, 8} and len(params[7]) == 1 and params[8] == b""

        def stock_context(name: str, secret: bytes, salt: bytes) -> Path:
            folder = tmp_path / name
            folder.mkdir()
            (folder / "secret.json").write_text(json.dumps({
                "sender-id_hex": params[7].hex(), "recipient-id_hex": params[8].hex(),
                "secret_hex": secret.hex(), "salt_hex": salt.hex(),
            }))
            creds = tmp_path / f"{name}.json"
            creds.write_text(json.dumps({f"{origin}/*": {"oscore": {"contextfile": str(folder)}}}))
            return creds

        good = stock_context("good", exported[:16], exported[16:])
        rc, out, err = await run(BIN / "aiocoap-client", "--credentials", good, f"{origin}/hello")
        assert rc == 0, err
        assert out.decode().strip() == "Hello from coap-server (mode oscore, layer 0 peer device-1)"
        marker = f"stock-{os.urandom(4).hex()}"
        rc, out, err = await run(BIN / "aiocoap-client", "--credentials", good, "-m", "POST",
                                 "--payload", marker, f"{origin}/echo")
        assert rc == 0, err
        assert out.decode().strip() == marker

        # Control: the halves the other way round (the ambiguity ATLS -05 leaves) do not work.
        swapped = stock_context("swapped", exported[16:], exported[:16])
        rc, out, err = await run(BIN / "aiocoap-client", "--credentials", swapped,
                                 f"{origin}/hello")
        assert rc != 0 and b"Hello from coap-server" not in out
        # coap-server refused it with an unprotected error (4.00 "Decryption failed").
        assert b"NotAProtectedMessage" in err


async def test_coap_client_talks_to_stock_aiocoap_oscore_server(keys: Path, tmp_path: Path) -> None:
    """coap-client keys through Layer 0 against a server whose OSCORE is aiocoap's own
    (OscoreSiteWrapper + FilesystemSecurityContext), directly and through coap-proxy."""
    body = os.urandom(3000)
    (tmp_path / "body").write_bytes(body)
    async with mode_peer("stock", keys) as (origin,), coap_proxy(
        "--listen", "coap://127.0.0.1:0"
    ) as (proxy,):
        results = await asyncio.gather(
            run(BIN / "coap-client", *e2e_cert_flags(keys), f"{origin}/hello"),
            run(BIN / "coap-client", *e2e_cert_flags(keys), "-P", proxy, "-m", "post",
                "-f", tmp_path / "body", "-o", tmp_path / "echoed", f"{origin}/echo"),
        )
    for rc, _, err in results:
        assert rc == 0, err
    hello = results[0][1].decode().strip()
    assert hello.startswith("stock FilesystemSecurityContext kid="), hello
    assert (tmp_path / "echoed").read_bytes() == body


# ------------------------------------------------------------------------ must-show 3


async def get_post_observe(keys: Path, tmp_path: Path, origin: str, proxy: str,
                           body: bytes) -> None:
    """GET and a POST echoed back byte-identical, each by a coap-client process, and (at the
    same time) Observe with three notifications by the client library coap-client uses, all in
    the OSCORE mode through ``proxy`` (Layer 1 PSK on the hop if it is coaps://)."""
    (tmp_path / "body").write_bytes(body)
    flags = [*e2e_cert_flags(keys), "-P", proxy, "--credentials", keys / "hop.json", "-B", "30"]
    (rc_get, hello, err_get), (rc_post, _, err_post), () = await asyncio.gather(
        run(BIN / "coap-client", *flags, f"{origin}/hello"),
        run(BIN / "coap-client", *flags, "-m", "post", "-f", tmp_path / "body",
            "-o", tmp_path / "echoed", f"{origin}/echo"),
        observe_three(keys, origin, proxy),
    )
    assert rc_get == 0, err_get
    assert hello.decode().strip() == "Hello from coap-server (mode oscore, layer 0 peer device-1)"
    assert rc_post == 0, err_post
    assert (tmp_path / "echoed").read_bytes() == body


async def observe_three(keys: Path, origin: str, proxy: str) -> tuple[()]:
    ctx = await layer1.create_context(
        client_credentials=layer1.ClientCredentials.from_file(str(keys / "hop.json"))
    )
    try:
        r = requester(ctx, keys, origin, proxy)
        pr = r.request(aiocoap.Message(code=Code.GET, uri=f"{origin}/sensors/temperature",
                                       observe=0))
        first = await asyncio.wait_for(pr.response, T)
        assert first.code == Code.CONTENT and first.opt.observe is not None, first
        sc = r.requester.security_context
        assert first.remote.security_context is sc
        notes = aiter(pr.observation)
        # coap-server's temperature notifies every second while observed.
        for _ in range(3):
            note = await asyncio.wait_for(anext(notes), T)
            assert note.code == Code.CONTENT and note.payload.endswith(b" C"), note
            assert note.remote.security_context is sc  # each one verified under OSCORE
        pr.observation.cancel()
    finally:
        await ctx.shutdown()
    return ()


async def test_get_post_observe_through_aiocoap_proxy(keys: Path, tmp_path: Path) -> None:
    """aiocoap-proxy --forward (with the launcher that fixes its Observe relaying, see
    aiocoap_proxy_observefix.py; nothing about OSCORE is changed) between coap-client and
    coap-server: keying handshake and OSCORE requests both cross it."""
    async with coap_server(keys) as (origin,), aiocoap_proxy(observe_fix=True) as proxy_port:
        await get_post_observe(keys, tmp_path, origin, f"coap://127.0.0.1:{proxy_port}",
                               os.urandom(3000))


async def test_get_post_observe_through_coap_proxy_with_layer1_psk_hides_plaintext(
    keys: Path, tmp_path: Path
) -> None:
    """coap-client -(coaps, Layer 1 PSK)-> coap-proxy -> recording relay -> coap-server. The
    relay's capture of everything the proxy forwarded, both ways, holds no plaintext marker
    of the requests or answers, and the OSCORE requests route without an outer Uri-Path."""
    marker = f"marker-{os.urandom(4).hex()}".encode()
    body = (marker * 200)[:3000]  # every inner block carries whole copies of the marker
    capture = tmp_path / "hop2.capture"
    async with coap_server(keys) as (origin,):
        host, port = origin.removeprefix("coap://").rsplit(":", 1)
        async with FaultRelay(listen=("127.0.0.1", 0), upstream=(host, int(port)),
                              record=capture) as relay, coap_proxy(
            "--listen", "coaps://127.0.0.1:0", "--psk-file", keys / "proxy-psk.json"
        ) as (proxy,):
            assert proxy.startswith("coaps://")
            target = f"coap://{relay.address[0]}:{relay.address[1]}"
            await get_post_observe(keys, tmp_path, target, proxy, body)
    forwarded = read_capture(capture)
    up = [aiocoap.Message.decode(d.data) for d in forwarded if d.direction is Direction.UP]
    down = [d for d in forwarded if d.direction is Direction.DOWN]
    assert up and down
    # (The certificates' names do cross: DTLS 1.2 sends certificates in clear.)
    for secret in (marker, b"Hello from coap-server", b"sensors", b"temperature", b"echo"):
        assert not any(secret in d.data for d in forwarded), secret
    oscore = [m for m in up if m.opt.oscore is not None]
    assert len(oscore) >= 3 + 2  # GET, POST (3 blocks), Observe registration
    assert all(m.opt.uri_path == () and m.code in (Code.POST, Code.FETCH) for m in oscore)
    # The keys were agreed through the same proxy, inside Layer 0.
    assert any(m.opt.uri_path[:2] == (".well-known", "atls") for m in up)


# ------------------------------------------------------------------------ must-show 4


async def test_replayed_request_is_refused_with_401_and_not_executed(
    keys: Path, tmp_path: Path, client_context: layer1.LayeredContext
) -> None:
    """A recording relay between coap-proxy and the server captures the OSCORE request of a
    non-idempotent POST; the exact bytes, sent again from a fresh socket, get an unprotected
    4.01 "Replay detected", and the server's counter shows the POST ran once."""
    capture = tmp_path / "hop2.capture"
    async with mode_peer("ours", keys) as (origin,), coap_proxy(
        "--listen", "coap://127.0.0.1:0"
    ) as (proxy,):
        host, port = origin.removeprefix("coap://").rsplit(":", 1)
        async with FaultRelay(listen=("127.0.0.1", 0), upstream=(host, int(port)),
                              record=capture) as relay:
            target = f"coap://{relay.address[0]}:{relay.address[1]}"
            r = requester(client_context, keys, target, proxy)
            first = await ask(r, Code.POST, f"{target}/count")
            assert (first.code, first.payload) == (Code.CHANGED, b"1")
            assert r.requester.keyings == 1

            sent = {d.data for d in read_capture(capture) if d.direction is Direction.UP}
            protected = [d for d in sent if aiocoap.Message.decode(d).opt.oscore is not None]
            assert len(protected) == 1  # (a retransmission would be the same bytes)
            answer = await udp_exchange(int(port), protected[0], T)
            assert answer is not None, "no answer to the replayed request"
            refused = aiocoap.Message.decode(answer)
            assert refused.code == Code.UNAUTHORIZED, refused
            assert refused.opt.oscore is None  # unprotected: the server could not verify it
            assert bytes(refused.payload).startswith(b"Replay detected")

            # Executed once: the counter is still 1, and the context still works.
            again = await ask(r, Code.GET, f"{target}/count")
            assert (again.code, again.payload) == (Code.CONTENT, b"1")
            second = await ask(r, Code.POST, f"{target}/count")
            assert second.payload == b"2"
            assert r.requester.keyings == 1


async def test_server_restart_leads_to_one_new_handshake(
    keys: Path, client_context: layer1.LayeredContext
) -> None:
    """coap-server is stopped and started again on the same port; the client object, kept,
    gets "Security context not found", runs one new Layer 0 handshake through coap-proxy by
    itself, and the request succeeds."""
    port = free_udp_port()
    async with coap_proxy("--listen", "coap://127.0.0.1:0") as (proxy,):
        async with coap_server(keys, port) as (origin,):
            r = requester(client_context, keys, origin, proxy)
            before = await ask(r, Code.GET, f"{origin}/hello")
            assert before.code == Code.CONTENT
            assert r.requester.keyings == 1
            old = r.requester.security_context
        async with coap_server(keys, port) as (again,):
            assert again == origin
            after = await ask(r, Code.GET, f"{origin}/hello")
        assert after.code == Code.CONTENT, after
        assert after.payload == b"Hello from coap-server (mode oscore, layer 0 peer device-1)"
        assert r.requester.keyings == 2
        assert r.requester.security_context is not old
        assert after.remote.security_context is r.requester.security_context


async def test_sequence_number_threshold_leads_to_new_handshake_in_time(
    keys: Path, client_context: layer1.LayeredContext
) -> None:
    """With a re-key threshold (here 2, in place of a number near 2**40), the requester runs a
    new Layer 0 handshake before the request that would cross it, not after exhaustion."""
    from coaplayers.oscore.mode import OscoreRequester

    async with coap_server(keys) as (origin,):
        ctx = client_context.context
        r = OscoreRequester(ctx, origin, lambda: Layer0Client(ctx, origin,
                                                               client_certificate(keys)),
                            rekey_threshold=2)
        contexts = []
        for expected_keyings in (1, 1, 2):
            answer = await asyncio.wait_for(r.request(aiocoap.Message(
                code=Code.GET, uri=f"{origin}/hello")).response, T)
            assert answer.code == Code.CONTENT, answer
            assert r.keyings == expected_keyings
            contexts.append(answer.remote.security_context)
        assert contexts[0] is contexts[1] is not contexts[2]
        assert contexts[1].sender_sequence_number == 2  # never beyond the threshold
        assert contexts[2].sender_sequence_number == 1


# ------------------------------------------------------------- separate authorization domains


async def test_layer1_credentials_do_not_authenticate_at_layer0(
    keys: Path, client_context: layer1.LayeredContext
) -> None:
    """Through coap-proxy with the client's hop PSK on Layer 1: the same identity with the hop
    key at Layer 0 is refused while the end-to-end key works; a hop certificate does not
    key OSCORE; a PSK Layer 0 session with the end-to-end key keys it (the server's PSK side
    is OpenSSL, which has the exporter), and a request outside Layer 0 cannot."""
    psk = json.loads((keys / "psk.json").read_text())
    hop = psk["hop1"]
    assert hop["identity"] == psk["e2e"]["identity"]  # same name, different layer and key
    async with coap_server(keys) as (origin,), coap_proxy(
        "--listen", "coaps://127.0.0.1:0", "--psk-file", keys / "proxy-psk.json"
    ) as (proxy,):
        via = ["-P", proxy, "--credentials", keys / "hop.json", "-B", "20"]

        def dtls_psk(key: str) -> list[str | Path]:
            return ["--layer0", "dtls", "--e2e-psk-identity", hop["identity"], "--e2e-psk", key]

        hop_as_e2e, e2e_ok, hop_cert = await asyncio.gather(
            run(BIN / "coap-client", *via, *dtls_psk(hop["key"]), f"{origin}/hello"),
            run(BIN / "coap-client", *via, *dtls_psk(psk["e2e"]["key"]), f"{origin}/hello"),
            run(BIN / "coap-client", *via, *e2e_cert_flags(keys, "proxy"), f"{origin}/hello"),
        )
        plain = await asyncio.wait_for(client_context.context.request(aiocoap.Message(
            code=Code.POST, uri=f"{origin}/.well-known/atls-oscore")).response, T)
        channel = Layer0Client(client_context.context, origin, dtls.PskClientCredentials(
            psk["e2e"]["identity"].encode(), dtls.parse_key_text(psk["e2e"]["key"])))
        try:
            keying = await asyncio.wait_for(channel.request(aiocoap.Message(
                code=Code.POST, uri_path=[".well-known", "atls-oscore"])).response, T)
        finally:
            await channel.close()
    rc, out, err = hop_as_e2e
    assert rc == 7 and out == b"", (rc, out, err)  # 7: security failure
    assert b"wrong key" in err  # the likely cause is named (a wrong PSK is silent in DTLS)
    rc, out, err = e2e_ok
    assert rc == 0, err
    assert out.decode().strip() == (
        "Hello from coap-server (mode layer0-dtls, layer 0 peer device-1)"
    )
    rc, out, err = hop_cert
    assert rc == 7 and out == b"", (rc, out, err)
    assert b"unknown_ca" in err
    assert keying.code == Code.CHANGED  # the server's PSK session has an exporter
    # Outside a Layer 0 session the keying resource refuses outright.
    assert plain.code == Code.UNAUTHORIZED and plain.payload.startswith(b"OSCORE keying needs")


# ------------------------------------------------------------- the documented wire example


def documented_example() -> dict[str, bytes]:
    """The byte-exact example of docs/OSCORE-KEYING.md, section 9, made by the implementation.

    Fixed inputs: inner token 5c, the exporter output 00..1f and the parameters of section 5
    (client_id a1b2, server_id empty), outer MID 0x0001 and token 01, sequence number 0.
    """
    from aiocoap.message import Direction as MessageDirection

    from coaplayers.layer0 import inner
    from coaplayers.oscore import OscoreParameters, Role, derive_context
    from coaplayers.oscore.mode import KEYING_PATH, PARAMETERS_CONTENT_FORMAT

    params = OscoreParameters(client_id=bytes.fromhex("a1b2"), server_id=b"")
    token = b"\x5c"
    out = {
        "inner keying request": inner.encode(
            token, aiocoap.Message(code=Code.POST, uri_path=KEYING_PATH)
        ),
        "inner keying response": inner.encode(token, aiocoap.Message(
            code=Code.CHANGED, content_format=PARAMETERS_CONTENT_FORMAT,
            payload=params.to_cbor(),
        )),
    }
    exported = bytes(range(32))
    client = derive_context(exported, params, Role.CLIENT)
    server = derive_context(exported, params, Role.SERVER)

    def outgoing(m: aiocoap.Message) -> aiocoap.Message:
        m.direction = MessageDirection.OUTGOING
        return m

    for name, options in (
        ("request", {}),
        ("request via proxy", {"proxy_scheme": "coap", "uri_host": "192.0.2.1",
                               "uri_port": 5683}),
    ):
        sender = derive_context(exported, params, Role.CLIENT) if options else client
        outer, _ = sender.protect(outgoing(aiocoap.Message(
            code=Code.GET, uri_path=["hello"], **options)))
        outer.mtype, outer.mid, outer.token = aiocoap.CON, 0x0001, b"\x01"
        out[f"OSCORE {name}"] = outer.encode()
    wire = aiocoap.Message.decode(out["OSCORE request"])
    plain, request_id = server.unprotect(wire)
    assert plain.code == Code.GET and plain.opt.uri_path == ("hello",)
    response, _ = server.context_for_response().protect(outgoing(aiocoap.Message(
        code=Code.CONTENT, payload=b"hi")), request_id)
    response.mtype, response.mid, response.token = aiocoap.ACK, 0x0001, b"\x01"
    out["OSCORE response"] = response.encode()
    refusal = aiocoap.Message(code=Code.UNAUTHORIZED, payload=b"Security context not found")
    refusal.mtype, refusal.mid, refusal.token = aiocoap.ACK, 0x0001, b"\x01"
    out["context not found"] = refusal.encode()
    return out


def test_documented_wire_example_is_what_the_implementation_sends() -> None:
    doc = " ".join((ROOT / "docs" / "OSCORE-KEYING.md").read_text().split())
    for name, data in documented_example().items():
        spaced = " ".join(f"{b:02x}" for b in data)
        assert spaced in doc, (name, spaced)


async def test_small_request_with_blockwise_answer_through_coap_proxy(
    keys: Path, client_context: layer1.LayeredContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-block GET takes the requester's direct path; its 64 KiB answer comes back in
    inner Block2 blocks, each block request protected afresh, and is reassembled."""
    from coaplayers.oscore.mode import OscoreRequester
    from coaplayers.programs.server.resources import Firmware

    direct = []
    original = OscoreRequester._exchange_direct

    async def counting(self: OscoreRequester, message: aiocoap.Message, sc: object) -> object:
        direct.append(message)
        return await original(self, message, sc)

    monkeypatch.setattr(OscoreRequester, "_exchange_direct", counting)

    async with coap_server(keys) as (origin,), coap_proxy(
        "--listen", "coap://127.0.0.1:0"
    ) as (proxy,):
        r = requester(client_context, keys, origin, proxy)
        hello = await ask(r, Code.GET, f"{origin}/hello")
        assert hello.code == Code.CONTENT
        sc = r.requester.security_context
        before = sc.sender_sequence_number
        image = await ask(r, Code.GET, f"{origin}/firmware")
        assert image.code == Code.CONTENT
        assert image.payload == Firmware().image
        assert image.remote.security_context is sc
        assert sc.sender_sequence_number - before == len(image.payload) // 1024
        assert len(direct) == 2  # /hello and the first block of /firmware
