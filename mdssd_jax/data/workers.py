"""Set-up of data worker processes (Grain's workers, the generator's pool), passed in from above.

A worker starts as a fresh interpreter, so the command's console set-up (which library lines are
shown) does not reach it by itself, and the data layer may not import the command line that owns
it. The command names its set-up function in the environment, which workers inherit,
`MDSSD_JAX_WORKER_INIT=package.module:function` (mdssd_jax/cli/console.py sets it to its
`configure_worker`), and `run_worker_init` calls it once per worker. Without it (tests, notebooks,
library use) nothing is done.
"""

import importlib
import os

WORKER_INIT_ENV = "MDSSD_JAX_WORKER_INIT"

_done = {"init": False}


def run_worker_init() -> None:
  """Calls the worker set-up the environment names, once per process; a no-op when none is named."""
  if _done["init"]:
    return
  _done["init"] = True
  target = os.environ.get(WORKER_INIT_ENV, "")
  if not target:
    return
  module_name, _, function_name = target.partition(":")
  if not module_name or not function_name:
    raise ValueError(f"{WORKER_INIT_ENV}={target!r} must be 'package.module:function'")
  getattr(importlib.import_module(module_name), function_name)()
