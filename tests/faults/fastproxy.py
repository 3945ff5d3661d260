"""coap-proxy with shorter CoAP retransmission timers, for the fault tests on loopback.

coap-proxy has no flag for its upstream CoAP timers (aiocoap's defaults: first retransmission
after 2-3 s, doubling). On loopback the round trip is well under a millisecond, so with 20 %
loss those defaults only make the run long, not the test stronger. This runs the very same
``coaplayers.programs.proxy.main`` after setting aiocoap's default ``TransportTuning`` from the
environment (``FAULTS_ACK_TIMEOUT``, ``FAULTS_MAX_RETRANSMIT``); nothing else changes.

    python -m tests.faults.fastproxy [coap-proxy arguments]
"""

from __future__ import annotations

import os
import sys

from aiocoap.numbers.constants import TransportTuning


def main() -> int:
    TransportTuning.ACK_TIMEOUT = float(os.environ.get("FAULTS_ACK_TIMEOUT", "2.0"))
    TransportTuning.MAX_RETRANSMIT = int(os.environ.get("FAULTS_MAX_RETRANSMIT", "4"))
    from coaplayers.programs.proxy import main as proxy_main

    sys.argv[0] = "coap-proxy"
    return int(proxy_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
