"""Which implementation each dispatch seam actually ran ("op:impl"), so a training log can show
whether a run took the kernel path or fell back to the plain-torch reference."""

from __future__ import annotations

from typing import List

_USED: set = set()


def record(op: str, impl: str) -> None:
    _USED.add(f"{op}:{impl}")


def kernels_used() -> List[str]:
    return sorted(_USED)


def reset() -> None:
    _USED.clear()
