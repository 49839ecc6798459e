"""``python -m search.ensemble``: the CLI in ``search.ensemble.cli``."""

import sys

from search.ensemble.cli import main

sys.exit(main())
