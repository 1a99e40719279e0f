"""Processes on this host: whether one is alive (the workdir lock's stale-lock test, the data
workers' orphan guard)."""

import os


def pid_alive(pid: int) -> bool:
  """Whether process `pid` exists (on this host); False for pid <= 0."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # exists, owned by someone else
    return True
  return True
