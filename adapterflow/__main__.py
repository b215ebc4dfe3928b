"""`python -m adapterflow ...` is the `adapterflow` command."""

import sys

from adapterflow.flows.cli import main

sys.exit(main())
