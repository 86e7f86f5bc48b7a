"""INT8 W8A8 recipe defaults: the SmoothQuant alpha grid and the protection default."""

from __future__ import annotations

ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


DEFAULT_PROTECT = 17


MIN_ABSMAX = 1e-6
