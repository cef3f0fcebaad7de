"""`python -m peftkit ...` is `peftkit ...` (the web UI starts runs this way, with its own interpreter)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
