"""`python -m runnerd.cli ...`: the same as the `runnerd` command."""

import sys

from runnerd.cli import main

sys.exit(main())
