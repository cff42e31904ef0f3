"""`python -m minipaged ...` is the `minipaged` command (see minipaged/entrypoints/cli.py)."""

import sys

from minipaged.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main())
