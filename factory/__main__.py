"""Entry point for `python -m factory`."""

import sys

from factory.cli import main

if __name__ == "__main__":  # not when a worker process (forkserver, spawn) re-imports the main module
    sys.exit(main())
