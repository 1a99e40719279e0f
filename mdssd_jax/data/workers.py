"""Set-up of data worker processes (Grain's workers, the generator's pool), named from above.

A worker starts as a fresh interpreter, so the command's console set-up (which library lines are
shown) does not reach it by itself, and the data layer may not import the command line that owns
it. The command registers its set-up function, `register_worker_init("package.module:function")`
(mdssd_jax/cli/console.py registers its `configure_worker`), which goes into the environment that
every process it starts inherits; in such a process `mdssd_jax.data`, imported before any of its
objects can be unpickled there, calls it once (`run_worker_init`). Without a registration (tests,
notebooks, library use) nothing is done.
"""

import importlib
import os

WORKER_INIT_ENV = "MDSSD_JAX_WORKER_INIT"          # "package.module:function"
REGISTERED_BY_ENV = "MDSSD_JAX_WORKER_INIT_PARENT"  # the pid of the process that registered it

_done = {"init": False}


def register_worker_init(target: str) -> None:
  """Names the function ("package.module:function") that processes started from this one run."""
  module_name, _, function_name = target.partition(":")
  if not module_name or not function_name:
    raise ValueError(f"worker init {target!r} must be 'package.module:function'")
  os.environ[WORKER_INIT_ENV] = target
  os.environ[REGISTERED_BY_ENV] = str(os.getpid())


def started_by_registered_process() -> bool:
  """True in a process started (directly or not) by the one that registered a worker init."""
  parent = os.environ.get(REGISTERED_BY_ENV, "")
  return bool(parent) and parent != str(os.getpid())


def run_worker_init() -> None:
  """Calls the registered worker set-up, once per process; a no-op when none is registered."""
  if _done["init"]:
    return
  _done["init"] = True
  target = os.environ.get(WORKER_INIT_ENV, "")
  if not target:
    return
  module_name, _, function_name = target.partition(":")
  getattr(importlib.import_module(module_name), function_name)()
