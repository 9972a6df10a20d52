"""medlens: self-configuring, evidence-first deep learning for medical imaging.

Rooms, in the direction data flows: ``io`` -> ``data`` -> ``plan`` -> ``tasks`` + ``models`` -> ``engine`` ->
``evaluate`` / ``explain`` -> ``report`` / ``serve`` -> ``cli``. Importing this package imports nothing heavy.
"""

from __future__ import annotations

__version__ = "0.1.0"
