"""coap-bench: throughput, latency, bytes on the wire, handshake cost and memory of every mode."""
