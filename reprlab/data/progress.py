"""Progress bars for the data side (scanning folders and shards, decoding into memory): tqdm with images/s and
an ETA, shown only on a terminal (``disable=None``), only when the caller asks (``train.progress``, rank 0), and
only once a step has lasted ``DELAY_S`` (a scan of a few hundred files prints nothing)."""

from __future__ import annotations

from typing import Any

DELAY_S = 1.0  # seconds before a bar appears: trivial scans and decodes stay silent


class _Off:
    """What a disabled bar does: nothing (no tqdm import, no terminal check)."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix_str(self, text: str) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> None: ...


def bar(total: int | None, desc: str, enabled: bool, unit: str = "img") -> Any:
    """A tqdm bar of ``total`` ``unit`` items (None: a count and a rate, no ETA), or a no-op when not
    ``enabled``; use it as a context manager and ``update(n)`` it."""
    if not enabled:
        return _Off()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None, delay=DELAY_S, mininterval=0.5,
                dynamic_ncols=True, leave=False)
