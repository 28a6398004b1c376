"""Array aliases shared by the local engine's modules."""

from __future__ import annotations

from typing import Any

import numpy.typing as npt

#: a frame: height x width x channels, uint8 or uint16 samples
Image = npt.NDArray[Any]
