"""Helper processes (Grain workers, the synthetic generator's pool) that end when their parent dies.

A trainer killed with kill -9 runs no clean-up, and its worker processes (a few hundred MB each)
would otherwise wait on their queues for minutes or for ever. Each worker runs a daemon thread that
checks every POLL_S seconds whether the process that started it is still its parent, and ends the
worker at once when it is not (the kernel re-parents orphans to init or a subreaper).

Why a watchdog and not Linux's prctl(PR_SET_PDEATHSIG): that signal fires when the *thread* that
started the child exits, and Grain starts its workers from threads of a pool that come and go,
which would kill healthy workers. The watchdog is also portable (macOS).
"""

import os
import threading
import time

from mdssd_jax.core.processes import pid_alive

POLL_S = 0.5

_watching = None   # the parent pid this process watches (one watchdog per process)
_lock = threading.Lock()


def watch_parent(parent_pid: int) -> bool:
  """Ends this process (os._exit) once `parent_pid` is no longer its parent. Idempotent.

  A no-op in the parent itself (a pipeline without worker processes runs its transforms there).
  Returns True when a watchdog runs in this process.
  """
  global _watching
  if os.getpid() == parent_pid:
    return False
  with _lock:
    if _watching is not None:
      return True
    _watching = parent_pid
    # Started by a fork server or similar, the parent is not our direct parent: watch that it lives.
    direct = os.getppid() == parent_pid
    if not direct and not pid_alive(parent_pid):
      os._exit(1)  # pylint: disable=protected-access   the parent is gone already
    threading.Thread(target=_watch, args=(parent_pid, direct), name="orphan_guard",
                     daemon=True).start()
  return True


def _watch(parent_pid, direct):
  while (os.getppid() == parent_pid) if direct else pid_alive(parent_pid):
    time.sleep(POLL_S)
  os._exit(1)  # pylint: disable=protected-access   no clean-up to run: the parent is gone


def worker_init_fn(parent_pid: int, unused_worker_index: int = 0, unused_worker_count: int = 0):
  """For Grain's mp_prefetch(worker_init_fn=functools.partial(worker_init_fn, os.getpid()))."""
  watch_parent(parent_pid)
