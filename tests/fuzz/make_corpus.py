"""Regenerate the seed corpus from the implementation: ``python -m tests.fuzz.make_corpus``.

Every sample is real output of coaplayers (a ClientHello from each backend, the server's
flights, an inner message, a parameters map, a protected OSCORE request, the configuration
files coap-keys writes...). Secrets in the file samples are replaced by fixed dummy values:
the corpus is public and must not look like leaked keys.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from aiocoap import Message
from aiocoap.numbers.codes import Code

from coaplayers.layer0 import inner
from coaplayers.oscore import ContextFile, OscoreParameters
from coaplayers.programs import keys

from . import peers
from .common import CORPUS

DUMMY_KEY = "00112233445566778899aabbccddeeff"


def _write(folder: str, name: str, data: bytes) -> None:
    path = CORPUS / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def dtls_datagrams() -> None:
    for backend, (new_client, new_listener) in peers.BACKENDS.items():
        client, listener = new_client(peers.L0_CONFIG), new_listener(peers.L0_CONFIG)
        hello, hvr, again = peers.cookie_exchange(client, listener, ("fuzz", 1))
        _write("dtls", f"{backend}_1_client_hello.bin", hello)
        _write("dtls", f"{backend}_2_hello_verify_request.bin", hvr)
        _write("dtls", f"{backend}_3_client_hello_cookie.bin", again)
        _, server = listener.accept(("fuzz", 1), again, 0.0)
        assert server is not None
        n = 4
        to_client = server.datagrams_to_send()
        for _ in range(20):
            for d in to_client:
                _write("dtls", f"{backend}_{n}_server.bin", d)
                n += 1
                client.receive_datagram(d, 0.0)
            to_server = client.datagrams_to_send()
            for d in to_server:
                _write("dtls", f"{backend}_{n}_client.bin", d)
                n += 1
                server.receive_datagram(d, 0.0)
            to_client = server.datagrams_to_send()
            if client.is_established and server.is_established and not to_client:
                break
        assert client.is_established and server.is_established
        client.send(b"\x01\x07\x02\xb4echo")  # an inner GET /echo
        _write("dtls", f"{backend}_{n}_application_data.bin", client.datagrams_to_send()[0])
        client.close()
        _write("dtls", f"{backend}_{n + 1}_close_notify.bin", client.datagrams_to_send()[0])
        server.abort()


def layer0_inner() -> None:
    samples = {
        "get_hello.bin": (b"\x01", Message(code=Code.GET, uri_path=["hello"])),
        "post_echo.bin": (b"\x01\x02\x03\x04", Message(
            code=Code.POST, uri_path=["echo"], payload=b"payload", content_format=0)),
        "observe.bin": (b"", Message(code=Code.GET, uri_path=["sensors", "temperature"],
                                     observe=0)),
        "block2_query.bin": (b"12345678", Message(
            code=Code.GET, uri_path=["firmware"], uri_query=["a=1", "b"], block2=(3, 0, 5))),
        "response_content.bin": (b"\x09", Message(
            code=Code.CONTENT, payload=b"21.5 C", content_format=0, etag=b"\x01\x02")),
        "response_bad_request.bin": (b"\x09", Message(code=Code.BAD_REQUEST)),
    }
    for name, (token, message) in samples.items():
        _write("layer0_inner", name, inner.encode(token, message))


def oscore() -> None:
    _write("oscore_params", "minimal.cbor", peers.PARAMS.to_cbor())
    _write("oscore_params", "all_fields.cbor", OscoreParameters(
        client_id=b"\x01\x02", server_id=b"\x0a", aead=3, hkdf=-11, id_context=b"ctx").to_cbor())
    _write("oscore_params", "gcm_long_ids.cbor", OscoreParameters(
        client_id=b"\x01\x02\x03\x04\x05\x06", server_id=b"", aead=1).to_cbor())
    client, server = peers.oscore_pair()
    request, _request_id = peers.protected_request(client)
    _write("oscore_messages", "request_post_echo.bin", peers.wire(request))
    observe, _ = peers.protected_request(client, Code.GET, ("sensors", "temperature"), b"")
    _write("oscore_messages", "request_get.bin", peers.wire(observe, 0x1235, b"\x08"))
    _unprotected, rid = server.unprotect(Message.decode(peers.wire(request)))
    from aiocoap.message import Direction

    response = Message(code=Code.CHANGED, payload=b"hello")
    response.direction = Direction.OUTGOING
    protected, _ = server.protect(response, rid)
    _write("oscore_messages", "response_changed.bin", peers.wire(protected))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "context.json"
        ContextFile.save(path, client)
        record = json.loads(path.read_text())
        for field in ("sender_key", "recipient_key"):
            record[field] = DUMMY_KEY
        _write("oscore_context", "client_context.json", json.dumps(record, indent=1).encode())


def files() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "keys"
        keys.create(folder)

        def clean(name: str) -> bytes:
            text = (folder / name).read_text()
            return re.sub(r"[0-9a-f]{32}", DUMMY_KEY, text).encode()

        for name in ("server.toml", "client.toml", "proxy.toml"):
            _write("config_toml", name, clean(name))
        for name in ("server-psk.json", "proxy-psk.json", "psk.json"):
            _write("psk_json", name, clean(name))
        for name in ("client-hop.json", "proxy-upstream.json"):
            _write("credentials_json", name, clean(name))
        shutil.rmtree(folder)
    _write("psk_json", "text_keys.json", json.dumps(
        {"dev1": "secret", "dev2": "0x" + DUMMY_KEY}).encode())
    _write("credentials_json", "mixed.json", json.dumps({
        "coaps://gateway.example*": {"dtls": {"psk": {"ascii": "secret"},
                                              "client-identity": {"ascii": "dev-1"}}},
        "coaps://[2001:db8::1]*": {"dtls-cert": {"cert": "client.pem", "key": "client.key",
                                                 "ca": "ca.pem"}},
    }, indent=1).encode())


def main() -> None:
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    dtls_datagrams()
    layer0_inner()
    oscore()
    files()
    print(f"corpus written to {CORPUS}")


if __name__ == "__main__":
    main()
