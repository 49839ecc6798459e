"""Planted label errors: people of a generated set written wrong in train.csv, with the truth.

A label-error finder (``search.labels``) can only be measured on errors whose truth is known.
With ``label_noise``, ``core.synth_layout`` has ``plant_label_noise`` give that share of train
people, per kind (its ``NOISE_KINDS``: gender, age, mask swap), one error each, and writes the
truth to its ``PLANTED_ERRORS`` file. A module of its own because noise is a layer on a layout,
not part of one (with its own random stream: without noise the layout is the same bytes);
``bench.labels`` plants the same kinds, as many, into a finished study's table with
``planted_count`` and ``AGE_SPANS``. This module imports ``core.synth_layout`` (its ``Person``
and age range), so the layout imports this one only where it plants.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from core.dataset import MASK_SWAP_VALUE
from core.labels import GENDER_NAMES, NUM_AGE, TRUE_OLD_FROM, YOUNG_BELOW, age_group
from core.synth_layout import NOISE_KINDS, OLDEST, YOUNGEST, Person


def planted_count(share: float, people: int) -> int:
    """Errors of each kind that ``share`` plants among ``people``: at least one when on, so a
    small set still carries every kind."""
    return 0 if share <= 0 else max(1, round(share * people))


#: Ages that each age group spans in generated data (YOUNGEST..OLDEST, split as core.labels).
AGE_SPANS: tuple[tuple[int, int], ...] = ((YOUNGEST, YOUNG_BELOW - 1),
                                          (YOUNG_BELOW, TRUE_OLD_FROM - 1), (TRUE_OLD_FROM, OLDEST))


def plant_label_noise(people: list[Person], fixes: Sequence[tuple[str, str, str]], share: float,
                      rng: np.random.Generator) -> tuple[list[Person], list[tuple[str, ...]]]:
    """Write ``planted_count(share, n)`` people of each kind wrong in train.csv / their folder
    names: gender flipped, age moved to another age group (a random age in it), or ``normal``
    and ``incorrect_mask`` photos swapped. Returns the people and the truth (``PLANTED_HEADER``
    rows, by target), so a label-error finder's recall and precision can be measured.

    Each planted person carries one error and is none of the built-in traps (``fixes``' targets)
    nor shares an id (a renamed folder could then collide with the other's): the truth stays
    unambiguous. ``rng`` is the noise's own, so the rest of the layout is drawn as without it.
    """
    k = planted_count(share, len(people))
    targets = {t for t, _, _ in fixes}
    ids = Counter(p.id for p in people)
    free = [i for i, p in enumerate(people)
            if p.folder not in targets and p.id not in targets and ids[p.id] == 1]
    if len(NOISE_KINDS) * k > len(free):
        raise ValueError(f"label noise {share} plants {k} error(s) of each of "
                         f"{len(NOISE_KINDS)} kinds: needs {len(NOISE_KINDS) * k} people apart "
                         f"from the built-in traps, the set has {len(free)}")
    chosen = rng.permutation(free)[: len(NOISE_KINDS) * k].reshape(len(NOISE_KINDS), k)
    people = list(people)
    truth: list[tuple[str, ...]] = []
    for kind, rows in zip(NOISE_KINDS, chosen.tolist(), strict=True):
        for i in rows:
            p = people[i]
            if kind == "gender":
                people[i] = replace(p, written_gender=1 - p.gender)
                row = (GENDER_NAMES[p.gender], GENDER_NAMES[1 - p.gender])
            elif kind == "age":
                group = int(age_group(p.age))
                new = [g for g in range(NUM_AGE) if g != group][int(rng.integers(NUM_AGE - 1))]
                lo, hi = AGE_SPANS[new]
                people[i] = replace(p, written_age=int(rng.integers(lo, hi + 1)))
                row = (str(p.age), str(people[i].written_age))
            else:
                people[i] = replace(p, swap_normal_incorrect=True)
                row = (MASK_SWAP_VALUE, "swapped")
            truth.append((people[i].folder, kind, *row))
    return people, sorted(truth)
