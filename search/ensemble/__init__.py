"""Ensemble a finished study's trials into a submission (``python -m search.ensemble``).

- ``cli``: the command: flags, loading the study, writing the submission CSV and JSON, the
  printed report (``__main__`` runs its ``main``).
- ``trials``: the study side: which complete trials may be ensembled (same data, folds and eval
  fingerprints), and their OOF / eval probabilities.
- ``select``: members and weights from OOF probabilities (forward selection, pool filter,
  bagging).
- ``decision``: the decision rule for macro F1: offsets on the log-probabilities.
- ``nested``: the whole recipe (pool, selection, offsets) fitted on some rows, and its nested
  cross-fitted estimate.
- ``choice``: the ensemble or the best single trial: both recipes' nested and in-sample figures
  (``compare``), the rule that picks one (``choose``), and that choice in words.
- ``submission``: what was submitted (``submission.json``) as every tool after the ensemble reads
  it, and ``decide``: blend plus decision rule, the one place classes come from.
- ``score``: ``python -m search.ensemble.score SUB ANSWERS``, a submission's macro F1 on true
  answers.
"""
