"""mdssd-jax: train, evaluate, predict with and prepare data for MDSSD / SSD detectors.

    python main.py --config=configs/mdssd300_voc.py --workdir=/ckpt            # train (resumes)
    python main.py --config=configs/mdssd300_voc.py --workdir=/ckpt --mode=eval
    python main.py --config=configs/mdssd300_voc.py --workdir=/ckpt --mode=predict --images='photos/*.jpg'
    python main.py --config=configs/mdssd300_voc.py --mode=prepare             # build the data set
    python main.py --config=configs/mdssd300_voc.py --mode=coverage            # default-box coverage

Kept short so that the library can be imported and tested (in a notebook too).
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, metrics and pictures go here.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "prepare", "coverage"],
                          "What to do.")
_STEP = flags.DEFINE_integer("step", None, "eval/predict: the checkpoint step (default: latest).")
_IMAGES = flags.DEFINE_list("images", [], "predict: image files or globs.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "predict: where JSON and pictures go "
                                  "(default: WORKDIR/predictions).")
_PLOT = flags.DEFINE_string("plot", None, "coverage: also plot the report to this PNG file.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods, "
                               "SLURM, or the --coordinator_* flags).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multihost: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multihost: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multihost: this process's index.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo_synthetic.py")
  if _MULTIHOST.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info("JAX process %d of %d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())

  mode = _MODE.value
  if mode == "prepare":
    from mdssd_jax.data import prepare  # pylint: disable=g-import-not-at-top
    prepare.prepare(config)
    return
  if mode == "coverage":
    from mdssd_jax import inference  # pylint: disable=g-import-not-at-top
    print(inference.coverage_for_config(config, plot_path=_PLOT.value))
    return
  if not _WORKDIR.value:
    raise app.UsageError(f"--workdir is required for --mode={mode}")
  from mdssd_jax import train  # pylint: disable=g-import-not-at-top
  if mode == "train":
    train.train_and_evaluate(config, _WORKDIR.value)
  elif mode == "eval":
    train.evaluate_checkpoint(config, _WORKDIR.value, step=_STEP.value)
  elif mode == "predict":
    if not _IMAGES.value:
      raise app.UsageError("--mode=predict needs --images=FILE_OR_GLOB[,...]")
    from mdssd_jax import inference  # pylint: disable=g-import-not-at-top
    inference.predict_from_checkpoint(config, _WORKDIR.value, _IMAGES.value,
                                      output_dir=_OUTPUT_DIR.value, step=_STEP.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
