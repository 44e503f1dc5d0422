"""``python -m omnicache.cli``: the ``omnicache`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
