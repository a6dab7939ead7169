"""Entry point for `python -m factory`."""

import sys

from factory.cli import main

sys.exit(main())
