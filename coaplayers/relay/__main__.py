"""``python -m coaplayers.relay``: the same as the ``coap-relay`` command."""

import sys

from .cli import main

sys.exit(main())
