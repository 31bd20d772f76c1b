"""What a degraded decision may be (``decision.degraded_policy``), shared by the engine and ``evaluate``.

While the feature store is unreachable, each transaction is scored by the fallback of its routed
variant (transaction-only features, its own thresholds). The policy then decides what that
score may do:

- ``score`` (default): the fallback's decision, as is;
- ``review``: at least ``review`` -- a fallback ``approve`` becomes ``review`` (a ``decline`` stays);
- ``approve-below``: a payment below ``decision.degraded_approve_below`` is approved, the others
  get the fallback's decision.

The amount is compared as the model sees it (the float32 ``amount`` feature, threshold rounded to
float32 too), so the engine and the offline evaluation agree on every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fraudactors.settings import DecisionSettings

POLICIES = ("score", "review", "approve-below")


@dataclass(frozen=True, slots=True)
class DegradedPolicy:
    mode: str = "score"
    approve_below: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in POLICIES:
            raise ValueError(f"unknown degraded policy {self.mode!r} (one of {', '.join(POLICIES)})")

    @classmethod
    def from_settings(cls, decision: DecisionSettings) -> DegradedPolicy:
        return cls(decision.degraded_policy, decision.degraded_approve_below)

    @property
    def label(self) -> str:
        return f"approve-below {self.approve_below:g}" if self.mode == "approve-below" else self.mode

    def apply(self, decision: str, amount: float) -> str:
        """The degraded decision, from the fallback's ``decision`` and the transaction's ``amount``."""
        if self.mode == "review":
            return "review" if decision == "approve" else decision
        if self.mode == "approve-below" and np.float32(amount) < np.float32(self.approve_below):
            return "approve"
        return decision
