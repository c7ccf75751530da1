"""`python -m broker_shim ...` is the `broker-shim` command."""

import sys

from broker_shim._cli import main

sys.exit(main())
