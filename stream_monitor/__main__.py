"""`python -m stream_monitor` is the `stream-monitor` command."""

import sys

from .cli import main

sys.exit(main())
