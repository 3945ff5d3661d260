"""coaplayers: CoAP with layered DTLS.

Layer 1 (``coaplayers.layer1``) is hop-by-hop DTLS over UDP, Layer 0 (``coaplayers.layer0``) is
end-to-end DTLS carried in CoAP payloads, ``coaplayers.oscore`` keys RFC 8613 OSCORE from the
Layer 0 handshake, and ``coaplayers.proxy`` forwards all of it on outer options only. All of them
use one sans-I/O DTLS engine, ``coaplayers.dtls``.
"""

__version__ = "0.1.0"
