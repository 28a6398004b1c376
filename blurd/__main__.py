"""`python -m blurd` is the `blurd` command."""

import sys

from blurd.cli import main

sys.exit(main())
