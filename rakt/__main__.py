"""`python -m rakt ...`: the `rakt` command."""
import sys

from rakt.cli import main

if __name__ == "__main__":
    sys.exit(main())
