"""coaplayers' tooling, installed as ``coaplayers_tools``: the fault relay and the benchmarks.

Kept apart from the library (``coaplayers``) that applications import: the library never
imports these (tests/test_layering.py), and their commands (coap-relay, coap-bench) are in
``coaplayers.programs`` with the other programs.
"""
