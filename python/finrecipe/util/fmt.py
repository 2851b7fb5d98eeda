"""How finrecipe writes sizes and durations for people (CLI tables, reports, log lines): once."""

from __future__ import annotations


def human_bytes(n: float | None, digits: int = 1) -> str:
    """1234567 -> '1.2 MB' (decimal units); None -> '?'."""
    if n is None:
        return "?"
    x = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(x) < 1000 or unit == "TB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.{digits}f} {unit}"
        x /= 1000
    return f"{x:.{digits}f} TB"  # pragma: no cover (the loop returns at TB)


def seconds(s: float | None, sep: str = " ") -> str:
    """12.34 -> '12.3 s', 600 -> '10.0 min' (with `sep` between number and unit); None -> '—'."""
    if not isinstance(s, (int, float)) or isinstance(s, bool):
        return "—"
    return f"{s:.1f}{sep}s" if s < 120 else f"{s / 60:.1f}{sep}min"


def duration(s: float) -> str:
    """3725 -> '1h02m', 75 -> '1m15s', 9.6 -> '10s' (ETAs and elapsed times in log lines)."""
    total = int(round(s))
    h, rem = divmod(total, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"
