"""``python -m lodo.aggregate DIR``: gather finished run folders into one table (``lodo.experiment.aggregate``)."""

import sys

from lodo.experiment.aggregate import main

if __name__ == "__main__":
    sys.exit(main())
