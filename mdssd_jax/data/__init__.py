"""Data sets (TFDS builders and their registry), the Grain input pipeline and Caffe-style augmentation."""

from mdssd_jax.data import workers

# A data worker process (Grain's, the generator's pool) starts as a fresh interpreter and unpickles
# our TFDS builders, which makes TFDS log, before any of our code in the worker runs; this package
# is imported first: give the worker the console of the command that started it (data/workers.py;
# a no-op outside main.py's commands).
if workers.started_by_registered_process():
  workers.run_worker_init()
