"""Shared test set-up: a persistent XLA compilation cache, so the many tiny training runs of the
tests (and their subprocesses, which inherit the environment) compile each program once, and
little XLA optimisation, since compiling dominates the tests' run time."""

import os
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CACHE = os.path.join(tempfile.gettempdir(), "mdssd_jax_test_xla_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests' models are tiny: XLA's full backend optimisation costs more compile time than it saves
# at run time. (Level 0 is faster still, but XLA:CPU 0.10 then returns NaN gradients through a
# batch-normalised map that feeds both a head and a max pool.)
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()
