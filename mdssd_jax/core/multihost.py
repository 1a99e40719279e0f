"""The data-parallel mesh, and barriers between the processes of a multi-process run, taken outside the compiled programs.

A collective inside a compiled program gives up when the processes reach it far apart: on CPU,
gloo sets up its context at the first collective with a 30 s limit, and later collectives time out
too. Compiling (or evaluating) can take each process a different time, more so on a shared
machine, so the processes meet at a barrier of the coordination service (no deadline that a slow
compile can miss) before the first collective of a newly compiled program.
"""

import itertools

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
