"""ClientCredentials.for_uri remembers its answers, and forgets them when the map changes."""

from __future__ import annotations

import pytest

from coaplayers import dtls
from coaplayers.layer1 import ClientCredentials


def _creds() -> ClientCredentials:
    creds = ClientCredentials()
    creds.add_psk("coaps://*", b"everyone", b"key-1")
    return creds


def test_repeated_lookups_give_the_same_credentials() -> None:
    creds = _creds()
    first = creds.for_uri("coaps://127.0.0.1:5684/")
    assert isinstance(first, dtls.PskClientCredentials)
    assert (first.identity, first.key) == (b"everyone", b"key-1")
    assert creds.for_uri("coaps://127.0.0.1:5684/") is first


def test_every_change_to_the_map_is_seen_by_the_next_lookup() -> None:
    creds = _creds()
    uri = "coaps://gw.example:5684/"
    assert creds.for_uri(uri).identity == b"everyone"
    creds.add_psk("coaps://gw.example*", b"gateway", b"key-2")  # more specific
    assert creds.for_uri(uri).identity == b"gateway"
    creds.load_from_dict({"coaps://gw.example*": {"dtls": {
        "psk": {"ascii": "k3"}, "client-identity": {"ascii": "gateway-3"}}}})
    assert creds.for_uri(uri).identity == b"gateway-3"
    del creds["coaps://gw.example*"]
    assert creds.for_uri(uri).identity == b"everyone"
    creds.update({"coaps://gw.example*": creds["coaps://*"]})
    assert creds.for_uri(uri).identity == b"everyone"
    creds.pop("coaps://gw.example*")
    creds.clear()
    with pytest.raises(dtls.ConfigurationError):
        creds.for_uri(uri)
    creds.setdefault("coaps://*", _creds()["coaps://*"])
    assert creds.for_uri(uri).identity == b"everyone"


def test_dtls_cert_takes_its_optional_members() -> None:
    """aiocoap's generic loader refused "ca" and "server-name" (it compares annotations as
    text); the entry checks its own members now."""
    creds = ClientCredentials("/etc/coap")
    creds.load_from_dict({"coaps://*": {"dtls-cert": {
        "cert": "c.pem", "key": "c.key", "ca": "ca.pem", "server-name": "gw.example"}}})
    item = creds["coaps://*"]
    assert (item.ca, item.server_name, str(item.base)) == ("ca.pem", "gw.example", "/etc/coap")
    with pytest.raises(dtls.ConfigurationError, match="dtls-cert needs 'key'"):
        ClientCredentials().load_from_dict({"coaps://*": {"dtls-cert": {"cert": "c.pem"}}})
