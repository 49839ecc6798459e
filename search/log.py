"""The logger every search module writes trial lines to (``log``).

Under Optuna's logger (``optuna.mask_search``), so trial lines look like Optuna's and follow its
verbosity; ``search.run --debug`` lowers its level to show failed trials' tracebacks.
"""

from __future__ import annotations

import optuna

log = optuna.logging.get_logger("optuna.mask_search")
