"""``python -m kvstore.checker HISTORY ...`` is ``kvstore check HISTORY ...``."""

import sys

from kvstore.checker.cli import main

if __name__ == "__main__":
    sys.exit(main())
