"""Durations as the console writes them: "12s", "12m34s", "12h34m" (the progress line, the closing
summary, data preparation's lines)."""

from typing import Optional


def format_duration(seconds: Optional[float], tenths_below_a_minute: bool = False) -> str:
  """12.3 -> "12s" ("12.3s" with tenths_below_a_minute), 754 -> "12m34s", 45296 -> "12h34m";
  None/NaN/inf -> "--"."""
  if seconds is None or seconds != seconds or seconds == float("inf"):
    return "--"
  seconds = max(0.0, float(seconds))
  if tenths_below_a_minute and seconds < 59.95:
    return f"{seconds:.1f}s"
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
