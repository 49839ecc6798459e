"""The 18-class encoding: the one place that knows how mask, gender and age make a class.

``class = mask * 6 + gender * 3 + age_group``. Everything else (dataset, losses, models,
ensemble) imports these names instead of repeating the numbers.
"""

from __future__ import annotations

import numpy as np

MASK_NAMES: tuple[str, ...] = ("wear", "incorrect", "not_worn")
GENDER_NAMES: tuple[str, ...] = ("male", "female")
AGE_GROUP_NAMES: tuple[str, ...] = ("<30", "30-59", ">=60")

NUM_MASK, NUM_GENDER, NUM_AGE = len(MASK_NAMES), len(GENDER_NAMES), len(AGE_GROUP_NAMES)
NUM_CLASSES = NUM_MASK * NUM_GENDER * NUM_AGE  # 18

#: Image file stem (without extension) -> mask kind. The 7 images every person folder holds.
MASK_BY_STEM: dict[str, int] = {
    "mask1": 0,
    "mask2": 0,
    "mask3": 0,
    "mask4": 0,
    "mask5": 0,
    "incorrect_mask": 1,
    "normal": 2,
}
IMAGE_STEMS: tuple[str, ...] = tuple(MASK_BY_STEM)
#: The two photos whose mask labels annotators swap (the real set's reported swaps; see
#: ``core.dataset``'s ``mask_swap`` corrections).
SWAPPED_STEMS: tuple[str, str] = ("incorrect_mask", "normal")

#: Gender as written in train.csv -> code.
GENDER_CODES: dict[str, int] = {"male": 0, "female": 1}

YOUNG_BELOW = 30  # age < 30 -> group 0
TRUE_OLD_FROM = 60  # the competition's threshold: age >= 60 -> group 2
MIN_AGE, MAX_AGE = 0, 120  # ages outside this range are input errors


def age_group(age: np.ndarray | int, threshold: int = TRUE_OLD_FROM) -> np.ndarray | int:
    """Age -> group 0/1/2. ``threshold`` is the first age counted as old (60 is the truth).

    A lower threshold (e.g. 58) relabels training targets only; see ``dataset.training_targets``.
    """
    if not YOUNG_BELOW < threshold <= TRUE_OLD_FROM + 10:
        raise ValueError(f"age threshold must be in {YOUNG_BELOW + 1}..{TRUE_OLD_FROM + 10}, "
                         f"got {threshold}")
    a = np.asarray(age)
    groups = np.where(a < YOUNG_BELOW, 0, np.where(a < threshold, 1, 2))
    return int(groups) if groups.ndim == 0 else groups.astype(np.int64)


def encode(mask: np.ndarray | int, gender: np.ndarray | int, age_grp: np.ndarray | int):
    """(mask, gender, age group) -> class in 0..17."""
    return np.asarray(mask) * (NUM_GENDER * NUM_AGE) + np.asarray(gender) * NUM_AGE + np.asarray(
        age_grp
    )


def decode(cls: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class in 0..17 -> (mask, gender, age group)."""
    c = np.asarray(cls)
    return c // (NUM_GENDER * NUM_AGE), (c // NUM_AGE) % NUM_GENDER, c % NUM_AGE


def class_name(cls: int) -> str:
    """Human-readable name of a class, e.g. ``'wear/female/30-59'`` (plots, per-class F1)."""
    m, g, a = decode(cls)
    return f"{MASK_NAMES[int(m)]}/{GENDER_NAMES[int(g)]}/{AGE_GROUP_NAMES[int(a)]}"


CLASS_NAMES: tuple[str, ...] = tuple(class_name(c) for c in range(NUM_CLASSES))


def factor_probs(probs18: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marginal (mask, gender, age) probabilities of 18-way probabilities, shape (N, 18)."""
    p = np.asarray(probs18).reshape(-1, NUM_MASK, NUM_GENDER, NUM_AGE)
    return p.sum(axis=(2, 3)), p.sum(axis=(1, 3)), p.sum(axis=(1, 2))
