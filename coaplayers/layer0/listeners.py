"""One Layer 0 endpoint for every end-to-end credential kind a server holds.

A server may accept PSK (OpenSSL's PSK listener), X.509 certificates (OpenSSL) and raw public
keys (GnuTLS) side by side. The backends cannot share a handshake, so each ClientHello is handed
to the listener of the kind it asks for, decided from the ClientHello alone (each listener then
runs its own stateless cookie exchange, when it asks for one, and the second ClientHello asks
for the same kind again):

1. it offers ``RawPublicKey`` (2) in a ``server_certificate_type`` extension (RFC 7250, type
   20): the raw-public-key listener;
2. it offers a PSK cipher suite: the PSK listener;
3. anything else: the certificate listener.

A ClientHello for a kind the server does not hold goes to a listener it does hold, whose
handshake then fails with an alert: the client learns at once that the server does not speak
its kind (rather than timing out).
"""

from __future__ import annotations

# Both layers dispatch this way, so the code lives with the DTLS engine.
from ..dtls.dual import KindListener
from ..dtls.records import RAW_PUBLIC_KEY, SERVER_CERTIFICATE_TYPE, offers_raw_public_key

__all__ = ["RAW_PUBLIC_KEY", "SERVER_CERTIFICATE_TYPE", "KindListener", "offers_raw_public_key"]
