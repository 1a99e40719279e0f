"""Data sets (TFDS builders and their registry), the Grain input pipeline and Caffe-style augmentation."""

import multiprocessing

# A data worker process (Grain, the generator's pool) starts as a fresh interpreter and unpickles
# our TFDS builders, which makes TFDS log, before any of our code in the worker runs: give it the
# same quiet console as the command that started it (data/workers.py; a no-op outside main.py's
# commands).
if multiprocessing.parent_process() is not None:
  from mdssd_jax.data import workers  # pylint: disable=g-import-not-at-top
  workers.run_worker_init()
