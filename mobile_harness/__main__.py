"""`python -m mobile_harness`: see mobile_harness/cli.py."""

import sys

from mobile_harness.cli import main

sys.exit(main())
