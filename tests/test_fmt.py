"""The one formatter of sizes and durations."""

from finrecipe.util.fmt import duration, human_bytes, seconds


def test_formats() -> None:
    assert [human_bytes(x) for x in (None, 999, 1234, 5_000_000_000, 3e15)] == [
        "?", "999 B", "1.2 KB", "5.0 GB", "3000.0 TB"]
    assert human_bytes(1234, digits=2) == "1.23 KB"
    assert [seconds(x) for x in (None, 12.34, 600)] == ["—", "12.3 s", "10.0 min"]
    assert seconds(5, sep="") == "5.0s"
    assert [duration(x) for x in (9.6, 75, 3725)] == ["10s", "1m15s", "1h02m"]
