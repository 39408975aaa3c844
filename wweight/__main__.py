"""``python -m wweight ...`` is the ``wweight`` command line (see :mod:`wweight.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
