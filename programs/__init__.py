"""The programs people run: every command's flags, configuration files and start-up.

Installed as ``coaplayers.programs`` (see pyproject.toml): ``proxy`` (coap-proxy), ``keys``
(coap-keys), ``relay`` (coap-relay), ``bench`` (coap-bench), ``demo`` (scripts/demo), ``config``
(TOML files under flags, shared by all of them), and the top-level client/ and server/ folders
as ``coaplayers.programs.client`` and ``coaplayers.programs.server``. The library never imports
them; only programs parse command lines (tests/test_layering.py).
"""
