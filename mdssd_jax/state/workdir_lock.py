"""One trainer per workdir: an exclusive lock file that a second trainer cannot take.

The lock is an `fcntl.flock` on WORKDIR/.trainer.lock, which the kernel drops when its process dies
(kill -9 included), so a crashed run never blocks the next one; the file records who held it (pid,
host, start time), so a second trainer can name the holder, and a new holder warns when it takes over
from a dead one. flock is reliable on local file systems; on network file systems across hosts it
may not be, which is why only process 0 of a multi-host run takes it (docs/training.md, "Resuming and
preemption").
"""

import fcntl
import json
import os
import socket
import time

from absl import logging

from mdssd_jax.core import processes

LOCK_FILE = ".trainer.lock"


class WorkdirBusyError(RuntimeError):
  pass


class WorkdirNotWritableError(PermissionError):
  """The workdir (or the folder it would be made in) cannot be written: read-only, no permission,
  or a file in the way."""


def make_workdir(workdir: str) -> None:
  """Creates `workdir` (and its parents) unless it exists; raises WorkdirNotWritableError naming it
  and the fix when that fails or the folder cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise _not_writable(workdir, e) from e


def _not_writable(workdir: str, error: OSError) -> WorkdirNotWritableError:
  reason = error.strerror or str(error)
  where = f" ({error.filename})" if error.filename and error.filename != workdir else ""
  return WorkdirNotWritableError(
      f"the workdir {workdir} cannot be written: {reason}{where}. Pass a --workdir on a disk you "
      "can write to, or make that folder writable.")


def _read_holder(text: str) -> dict:
  """The JSON record a holder wrote ({} if empty or unreadable)."""
  try:
    record = json.loads(text) if text.strip() else {}
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def describe_holder(record: dict) -> str:
  """'process 123 on host h, since 2024-01-01 12:00:00' (or 'an unknown process')."""
  if not record:
    return "an unknown process"
  return (f"process {record.get('pid', '?')} on host {record.get('host', '?')}, since "
          f"{record.get('since', '?')}")


def _dead_on_this_host(record: dict) -> bool:
  return (bool(record) and record.get("host") == socket.gethostname()
          and not processes.pid_alive(int(record.get("pid", -1))))


class WorkdirLock:
  """Context manager holding the workdir's trainer lock; raises WorkdirBusyError if another holds it.

  The lock file's descriptor is not inherited by programs the trainer starts (Python opens files
  close-on-exec); forked worker processes do share it, and keep the lock until they exit.
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._file = None

  def __enter__(self):
    make_workdir(self.workdir)
    try:
      f = open(self.path, "a+")
    except OSError as e:   # a read-only file system or folder: the first write of a run
      raise _not_writable(self.workdir, e) from e
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = _read_holder(f.read())
      f.close()
      if _dead_on_this_host(holder):
        # The holder died but a process it forked (a data worker) still holds the descriptor.
        detail = (f"{describe_holder(holder)}, which is no longer running; a worker process it "
                  "started still holds the lock and should exit within seconds. Retry shortly")
      else:
        detail = (f"{describe_holder(holder)}. Two trainers on one workdir overwrite each other's "
                  "checkpoints. Wait for it to finish, stop it, or choose another --workdir")
      raise WorkdirBusyError(f"the workdir {self.workdir} is in use by another trainer: {detail} "
                             f"(lock file {self.path}).") from None
    f.seek(0)
    previous = _read_holder(f.read())
    if _dead_on_this_host(previous):
      logging.warning("took over the lock of the workdir %s from %s, which is no longer running "
                      "(a crashed or killed run); resuming from its last complete checkpoint",
                      self.workdir, describe_holder(previous))
    f.seek(0)
    f.truncate()
    f.write(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                            since=time.strftime("%Y-%m-%d %H:%M:%S"))))
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      # An empty file means "released cleanly"; a record left behind means its holder died.
      self._file.seek(0)
      self._file.truncate()
      self._file.flush()
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None
