"""Test-only fault injection (REMBG_FAULT_ERROR_RATIO): the 5xx the error-ratio alert needs.

Nothing real makes a healthy server answer 5xx on demand, so the alert tests ask for them.
The schedule is a counter, not a coin: of the first n eligible requests exactly
floor(n * ratio) fail, evenly spread (ratio 0.25: the 4th, 8th, 12th, ...).
"""

from __future__ import annotations

import math
from fractions import Fraction

FAULT_STATUS = 500
FAULT_MESSAGE = "injected fault (REMBG_FAULT_ERROR_RATIO)"


class FaultSchedule:
    def __init__(self, ratio: float) -> None:
        if not 0 <= ratio <= 1:
            raise ValueError(f"fault ratio {ratio} is not within 0..1")
        self.ratio = Fraction(ratio).limit_denominator(1_000_000)
        self._count = 0

    @property
    def enabled(self) -> bool:
        return self.ratio > 0

    def fires(self) -> bool:
        """Whether the next eligible request gets the injected fault."""
        if not self.enabled:
            return False
        self._count += 1
        return math.floor(self._count * self.ratio) > math.floor((self._count - 1) * self.ratio)
