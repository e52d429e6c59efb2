"""SQLite store-and-forward buffer: readings in, per-sink cursors out."""

from buffer.reading import Quality, Reading, StoredReading, format_ts, now_us

__all__ = ["Quality", "Reading", "StoredReading", "format_ts", "now_us"]
