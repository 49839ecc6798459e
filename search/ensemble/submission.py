"""What ``search.ensemble`` submitted (``submission.json``), as every tool after it reads it.

Why a dataclass: the ensemble writes the JSON; report, predict, labels and the benches read it.
Fields instead of string keys with guessed defaults make a change of the format fail in one
place, and the blend plus decision rule is applied by one function (``decide``) for the
ensemble's own choice and for every reader. ``from_json`` still reads a JSON of the first
version (no ``why``, ``recipe``, ``rule`` or ``offsets``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from search.ensemble.decision import apply_offsets
from search.ensemble.select import blend

#: Top-level JSON keys that name the rows the members' probabilities belong to.
FINGERPRINT_SUFFIX = "_fingerprint"


def decide(probs: Sequence[np.ndarray], weights: np.ndarray,
           offsets: Sequence[float] | np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(blended probabilities, classes): the weighted blend, then the decision rule (offsets
    on the log-probabilities; ``None``: the plain argmax)."""
    blended = blend(probs, weights)
    if offsets is None:
        return blended, blended.argmax(axis=1).astype(np.int64)
    return blended, apply_offsets(blended, np.asarray(offsets)).astype(np.int64)


@dataclass(frozen=True)
class Member:
    """One trial of the submission and its weight (what it scored when chosen, for people)."""

    trial: int
    weight: float
    rank: int = 0
    value: float = math.nan
    oof_f1: float = math.nan


@dataclass(frozen=True)
class Submission:
    """The choice (``uses``: "ensemble" or "best_single", and ``why``), its members, its
    decision rule, the figures behind it and where it was written."""

    members: tuple[Member, ...]
    offsets: tuple[float, ...] | None = None
    uses: str = "ensemble"
    why: str = ""
    rule: str = "argmax"
    study: str = ""
    storage: str = ""
    csv: str = ""  # the submission CSV ("submission" in the JSON)
    candidates: int = 0
    recipe: dict[str, Any] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    answers: str | None = None  # eval_answers.csv when the data ship it (synthetic sets)
    gradcam: str | None = None

    @property
    def weights(self) -> np.ndarray:
        return np.array([m.weight for m in self.members], dtype=np.float64)

    def classes(self, member_probs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(blended probabilities, classes) of ``member_probs`` (in ``members`` order) as this
        submission decides: its weights, then its offsets or the plain argmax."""
        return decide(member_probs, self.weights, self.offsets)

    def what_it_uses(self) -> str:
        """What it submits and why, in words (the CLI's last lines, the report)."""
        if self.uses != "ensemble":
            what = f"the best single trial ({self.why or 'the nested estimate chose it'})"
        elif len(self.members) == 1:
            what = "the ensemble, which is the best trial alone"
        else:
            what = "the ensemble"
        kind = self.recipe.get("offsets_tried", "decision")
        return f"{what}, {f'{kind} offsets' if self.offsets else 'plain argmax'}"

    def to_json(self) -> dict[str, Any]:
        """The JSON's layout (as the first version had it: fingerprints at the top level, the
        CSV's path under "submission")."""
        out: dict[str, Any] = {
            "study": self.study, "storage": self.storage, "submission": self.csv,
            "uses": self.uses, "why": self.why, "rule": self.rule,
            "offsets": list(self.offsets) if self.offsets is not None else None,
            "candidates": self.candidates, "recipe": self.recipe, **self.fingerprints,
            "members": [asdict(m) for m in self.members], "figures": self.figures,
            "notes": list(self.notes), "answers": self.answers}
        if self.gradcam is not None:
            out["gradcam"] = self.gradcam
        return out

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Submission:
        """From ``to_json``'s dict, or a first-version JSON (missing keys take the defaults)."""
        members = tuple(Member(**{k: m[k] for k in Member.__dataclass_fields__ if k in m})
                        for m in payload.get("members", ()))
        offsets = payload.get("offsets")
        return cls(
            members=members,
            offsets=tuple(float(x) for x in offsets) if offsets else None,
            uses=payload.get("uses", "ensemble"), why=payload.get("why") or "",
            rule=payload.get("rule") or ("offsets" if offsets else "argmax"),
            study=payload.get("study", ""), storage=payload.get("storage", ""),
            csv=payload.get("submission", ""), candidates=int(payload.get("candidates", 0)),
            recipe=dict(payload.get("recipe") or {}),
            fingerprints={k: v for k, v in payload.items() if k.endswith(FINGERPRINT_SUFFIX)},
            figures=dict(payload.get("figures") or {}), notes=tuple(payload.get("notes") or ()),
            answers=payload.get("answers"), gradcam=payload.get("gradcam"))
