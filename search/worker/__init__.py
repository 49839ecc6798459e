"""What a search worker process does: claim trials, run them, keep to the budget and the disk.

- ``trial_loop``: one worker's loop: claim a trial, run it with a heartbeat, tell Optuna;
  failures, storage outages.
- ``claims``: who runs which trial: claiming without overshoot under a study-wide lock, trial
  owners, reaping dead workers.
- ``budget``: the wall-clock budget (``--hours`` / ``--timeout``), honoured inside trials.
- ``retention``: fold checkpoints kept for the best trials only.
- ``storage``: opening an Optuna storage from a URL (SQLite, PostgreSQL, journal file).
- ``launcher``: the parent of ``--workers N`` / ``--gpus``: one ``search.run`` process each.
- ``stage``: search-stage and final-stage trials: which ones a search counts, claims and prunes
  against.
- ``final_stage``: which configurations the final stage retrains, and how each one ended.

The CLIs that drive them stay at the top: ``search.run`` (a search) and ``search.refit`` (the
final stage on its own).
"""
