"""What the competition's top teams credited, as searched options shared by the studies.

A weighted sampler for the rare classes, a soft macro-F1 term mixed into the loss, and an
ordinal age head (three-head model only); half CutMix is a ``mix`` choice (``core.config.MIXES``).
One function, so the ``mask`` and ``quality`` studies search them alike (issue 28).
"""

from __future__ import annotations

from typing import Any

import optuna

from core.config import AGE_HEADS, SAMPLERS

#: The soft macro-F1 share when it is on; a top team of the competition used 0.4 with focal loss.
SOFT_F1_WEIGHTS = (0.1, 0.6)
#: A warm-start recipe pins these so it stays the recipe it was (all off).
OFF = {"sampler": "none", "soft_f1": False}


def top_team_options(trial: optuna.Trial, head: str) -> dict[str, Any]:
    """``TrainConfig`` keyword arguments: ``sampler``, ``soft_f1_weight`` and ``age_head``.

    Soft-F1 is an on/off choice first, so "off" is a real choice TPE can weigh (a float range
    never hits 0 exactly); the ordinal age head needs an age head of its own, which only the
    three-head model has, so it is suggested for ``head == "multi"`` only.
    """
    soft_f1 = trial.suggest_categorical("soft_f1", [False, True])
    return {
        "soft_f1_weight": (trial.suggest_float("soft_f1_weight", *SOFT_F1_WEIGHTS)
                           if soft_f1 else 0.0),
        "sampler": trial.suggest_categorical("sampler", list(SAMPLERS)),
        "age_head": (trial.suggest_categorical("age_head", list(AGE_HEADS)) if head == "multi"
                     else "classes"),
    }
