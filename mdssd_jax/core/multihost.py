"""The data-parallel mesh, barriers between the processes of a multi-process run (taken outside the
compiled programs), and a watchdog that ends a run whose peer process stopped answering.

A collective inside a compiled program gives up when the processes reach it far apart: on CPU,
gloo sets up its context at the first collective with a 30 s limit, and later collectives time out
too. Compiling (or evaluating) can take each process a different time, more so on a shared
machine, so the processes meet at a barrier of the coordination service (no deadline that a slow
compile can miss) before the first collective of a newly compiled program.
"""

import itertools
import os
import sys
import threading
import time

import jax
import numpy as np

# The mesh axis the batch is split over (data parallelism; the state is replicated along it).
DATA_AXIS = "data"


def data_mesh(devices=None):
  """The 1-D device mesh of training and evaluation: `devices` (default: all) along DATA_AXIS."""
  return jax.sharding.Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))

# Every process takes the barriers in the same order, so a counter makes each id unique.
_COUNTER = itertools.count()


def barrier(name, timeout_s=3600):
  """Waits until every process has reached barrier `name`; returns at once on one process."""
  if jax.process_count() == 1:
    return
  # jax.distributed keeps its coordination-service client here; jax has no public barrier that
  # avoids a compiled collective (multihost_utils.sync_global_devices runs one).
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("a multi-process run without jax.distributed.initialize(); start every "
                       "process with main.py --multihost")
  client.wait_at_barrier(f"mdssd_jax/{name}/{next(_COUNTER)}", int(timeout_s * 1000))


# ---------------------------------------------------------------------------------------------------
# A process that stops answering: dead (kill -9, a lost host), stopped (SIGSTOP) or stalled.
# ---------------------------------------------------------------------------------------------------

# The config key of the timeout, named in the error so that a user knows what to raise.
TIMEOUT_KEY = "config.train.collective_timeout_s"
# Called (no arguments) before the watchdog ends the process, e.g. to flush the console's pipes.
EXIT_HOOKS = []


def heartbeat_timeout_s(collective_timeout_s):
  """JAX's own heartbeat timeout (jax.distributed.initialize) for a run with this collective timeout.

  JAX's coordination service also declares a silent process dead, but then aborts every other
  process from C++ (SIGABRT, a stack trace, no config key). Twice the watchdog's timeout (and at least
  30 s more) keeps it the backstop: the watchdog's one clear error comes first.
  """
  return int(max(2 * collective_timeout_s, collective_timeout_s + 30))


class PeerWatchdog:
  """Ends this process with one error naming a peer process that has stopped answering.

  Why: a process that dies or stops at a collective (the all-reduce of a train step, Orbax's
  barrier of a multi-process save) leaves the others blocked inside a compiled program or a
  barrier that nothing can interrupt from Python, and JAX's heartbeat answer is an abort with a
  stack trace. Here every process writes a counter into the coordination service's key-value store
  every `beat_s` (one thread: it runs while the main thread is blocked), reads the others', and when
  one has not changed for `timeout_s` (by this process's clock, so hosts' clocks need not agree),
  or the coordination service itself (process 0) has not answered for that long, it runs
  EXIT_HOOKS, writes one `Error:` line naming that process and TIMEOUT_KEY, and exits with status 1. A checkpoint that was being written stays a temporary
  folder, which the next start removes (checkpointing.make_manager).

  A context manager; a no-op in a one-process run. `stop()` before the processes part for good (the
  end of training), so that a peer that finished first is not taken for a dead one.
  """

  def __init__(self, timeout_s, beat_s=1.0, exit_fn=None):
    self.timeout_s = float(timeout_s)
    self.beat_s = min(float(beat_s), self.timeout_s / 4)
    self._exit_fn = exit_fn or os._exit  # pylint: disable=protected-access
    self._stop = threading.Event()
    self._threads = []
    self.failure = None   # the message, once a peer was declared gone

  def __enter__(self):
    if jax.process_count() == 1 or self.timeout_s <= 0:
      return self
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    self._client = distributed.global_state.client
    now = time.monotonic()
    self._last_change = {p: now for p in range(jax.process_count()) if p != jax.process_index()}
    self._last_value = {}
    self._last_exchange = now
    for target in (self._beat, self._judge):
      thread = threading.Thread(target=target, name=f"mdssd_jax_watchdog{target.__name__}",
                                daemon=True)
      thread.start()
      self._threads.append(thread)
    return self

  def stop(self):
    self._stop.set()

  def __exit__(self, exc_type, exc, tb):
    if exc is not None and self._threads and _peer_gone(exc):
      # A collective failed because a peer went away (Gloo's "Connection reset by peer"): wait for
      # the heartbeat to name that process (_judge ends this one with its one line) rather than
      # report the transport's words. A peer that still beats is no dead one: the error stands.
      deadline = time.monotonic() + self.timeout_s + 2 * self.beat_s
      while self.failure is None and time.monotonic() < deadline:
        time.sleep(0.2)
    self.stop()

  def _beat(self):
    me, count = jax.process_index(), 0
    while not self._stop.is_set():
      count += 1
      try:
        self._client.key_value_set(f"{_ALIVE_DIR}{me}", str(count), allow_overwrite=True)
        values = dict(self._client.key_value_dir_get(_ALIVE_DIR))
      except Exception:  # pylint: disable=broad-except
        values = None   # the service did not answer: _judge counts the silence
      now = time.monotonic()
      if values is not None:
        self._last_exchange = now
        for process in self._last_change:
          value = values.get(f"{_ALIVE_DIR}{process}")
          if value is not None and value != self._last_value.get(process):
            self._last_value[process] = value
            self._last_change[process] = now
      self._stop.wait(self.beat_s)

  def _judge(self):
    while not self._stop.wait(min(1.0, self.beat_s)):
      now = time.monotonic()
      if now - self._last_exchange > self.timeout_s:
        # The coordination service, hosted by process 0, is silent: the others' state is unknown.
        silent, since = [0], self._last_exchange
      else:
        silent = sorted(p for p, t in self._last_change.items() if now - t > self.timeout_s)
        since = min((self._last_change[p] for p in silent), default=now)
      if silent and not self._stop.is_set():
        self._give_up(silent, now - since)
        return

  def _give_up(self, silent, silent_s):
    names = ", ".join(str(p) for p in silent)
    self.failure = (
        f"process {names} of {jax.process_count()} stopped answering: no sign of life for "
        f"{silent_s:.0f} s, more than {TIMEOUT_KEY}={self.timeout_s:g} (it died, was stopped, or is "
        f"stalled by a slow disk or swapping). Process {jax.process_index()} stops too rather than "
        "wait for it at the next collective. Rerun the same command on every process: training "
        f"resumes from the last checkpoint that every process completed (raise {TIMEOUT_KEY} if "
        "the processes are only slow).")
    # One line, as main.py ends every failure (not also a logging record: the same text twice).
    try:
      for hook in EXIT_HOOKS:
        hook()
      sys.stderr.write(f"Error: {self.failure}\n")
      sys.stderr.flush()
      sys.stdout.flush()
      if not EXIT_HOOKS:
        time.sleep(0.5)   # a console pipe without a hook to close it: time to pass the line on
    finally:
      self._exit_fn(1)


_ALIVE_DIR = "mdssd_jax/alive/"
# How a collective or the coordination service reports a peer that went away mid-operation.
_PEER_GONE_MARKERS = ("Connection reset by peer", "Connection refused", "Gloo", "UNAVAILABLE",
                      "DEADLINE_EXCEEDED", "Socket closed", "Broken pipe")


def _peer_gone(exc):
  """Whether `exc` (or what it was raised from) reads as a peer process gone mid-collective."""
  while exc is not None:
    if any(marker in str(exc) for marker in _PEER_GONE_MARKERS):
      return True
    exc = exc.__cause__ or exc.__context__
  return False
