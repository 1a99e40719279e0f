"""mdssd-jax: train, evaluate, predict with and prepare data for MDSSD / SSD detectors.

    python main.py --config=configs/mdssd300_voc.py --workdir=/ckpt            # train (resumes)
    python main.py --config=configs/mdssd300_voc.py --workdir=/ckpt --mode=eval
    python main.py --config=configs/mdssd300_voc.py --workdir=/ckpt --mode=predict --images='photos/*.jpg'
    python main.py --config=configs/mdssd300_voc.py --workdir=/ckpt --mode=export   # SavedModel, TFLite, jax
    python main.py --config=configs/mdssd300_voc.py --mode=prepare             # build the data set
    python main.py --config=configs/mdssd300_voc.py --mode=coverage            # default-box coverage
    python main.py --config=configs/mdssd300_voc.py --mode=coverage --suggest  # default boxes from the data

Kept short so that the library can be imported and tested (in a notebook too).
"""

import errno
import os
import sys
import threading
import traceback

from absl import app
from absl import flags
from absl import logging

from mdssd_jax.cli import console
from mdssd_jax.cli import user_errors
from mdssd_jax.report import progress

# Before JAX (and TensorFlow, which clu and TFDS load) read their logging environment.
console.set_library_environment(sys.argv)

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, metrics and pictures go here.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "prepare", "coverage", "export"],
                          "What to do.")
_STEP = flags.DEFINE_integer("step", None, "eval/predict: the checkpoint step (default: latest).")
_IMAGES = flags.DEFINE_list("images", [], "predict: image files or globs.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "predict: where JSON and pictures go "
                                  "(default: WORKDIR/predictions).")
_FORMATS = flags.DEFINE_list("formats", None, "export: any of saved_model,tflite,jax (default: "
                             "config.export.formats).")
_TFLITE_QUANTIZATION = flags.DEFINE_enum("tflite_quantization", None, ["none", "float16", "dynamic_range"],
                                         "export: TFLite weights (default: config.export.tflite_quantization).")
_PLOT = flags.DEFINE_string("plot", None, "coverage: also plot the report to this PNG file.")
_SUGGEST = flags.DEFINE_bool("suggest", False, "coverage: also search default boxes (sizes and aspect "
                             "ratios per head) for the training split's boxes and print the flags.")
_SUGGEST_RATIOS = flags.DEFINE_list("suggest_ratios", None, "coverage --suggest: aspect ratios per head "
                                    "(one count, or one per head; default: the config's, so the heads "
                                    "keep their shapes).")
_SUGGEST_SEED = flags.DEFINE_integer("suggest_seed", 0, "coverage --suggest: the search's seed.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods, "
                               "SLURM, or the --coordinator_* flags).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multihost: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multihost: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multihost: this process's index.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MULTIHOST.value and flags.FLAGS.verbosity < 1:
    # Before `configure` binds the console to sys.stdout / sys.stderr: it replaces them.
    console.hide_native_library_lines()
  # -v / --verbosity=1 (absl's flag) shows the libraries' INFO lines too; the default hides them.
  console.configure(flags.FLAGS.verbosity)
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()   # a file that failed to load is a stand-in that raises on first use
  except OSError as err:
    message = user_errors.config_file_message(
        config_flags.get_config_filename(flags.FLAGS["config"]), err)
    if message is None:
      raise
    raise FileNotFoundError(message) from None
  _LOADED["config"] = config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo_synthetic.py")
  if _MULTIHOST.value:
    from mdssd_jax.core import multihost  # pylint: disable=g-import-not-at-top
    # JAX's heartbeat is the backstop behind train.py's watchdog (config.train.collective_timeout_s),
    # whose one clear error comes first; the watchdog flushes the console before it ends the process.
    timeout_s = float(config.get("train", {}).get("collective_timeout_s", 0) or 0)
    extra = ({"heartbeat_timeout_seconds": multihost.heartbeat_timeout_s(timeout_s)}
             if timeout_s > 0 else {})
    multihost.EXIT_HOOKS.append(console.restore_native_output)
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               **extra)
  mode = _MODE.value
  if mode == "prepare":   # no devices used: its first line says what it reads
    from mdssd_jax.data import prepare  # pylint: disable=g-import-not-at-top
    prepare.prepare(config)
    return
  logging.info("JAX process %d of %d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  if mode == "coverage":
    if _SUGGEST.value:
      from mdssd_jax.run import anchor_design  # pylint: disable=g-import-not-at-top
      ratios = _SUGGEST_RATIOS.value
      progress.say(anchor_design.suggest_for_config(
          config, ratios_per_head=[int(r) for r in ratios] if ratios else None,
          seed=_SUGGEST_SEED.value, plot_path=_PLOT.value))
      return
    from mdssd_jax.run import anchor_coverage  # pylint: disable=g-import-not-at-top
    progress.say(anchor_coverage.coverage_for_config(config, plot_path=_PLOT.value))
    return
  if not _WORKDIR.value:
    raise app.UsageError(f"--workdir is required for --mode={mode}")
  # The library is imported here, after the flags and the console are set up.
  if mode == "train":
    from mdssd_jax.run import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, _WORKDIR.value)
  elif mode == "eval":
    from mdssd_jax.run import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate_checkpoint(config, _WORKDIR.value, step=_STEP.value)
  elif mode == "predict":
    if not _IMAGES.value:
      raise app.UsageError("--mode=predict needs --images=FILE_OR_GLOB[,...]")
    from mdssd_jax.run import predict  # pylint: disable=g-import-not-at-top
    predict.predict_from_checkpoint(config, _WORKDIR.value, _IMAGES.value,
                                    output_dir=_OUTPUT_DIR.value, step=_STEP.value)
  elif mode == "export":
    from mdssd_jax.run import export  # pylint: disable=g-import-not-at-top
    export.export_checkpoint(config, _WORKDIR.value, step=_STEP.value, formats=_FORMATS.value,
                             tflite_quantization=_TFLITE_QUANTIZATION.value)


# What main() loaded, for the error handler: the config (None until it loaded).
_LOADED = {"config": None}

# Errors whose message already names the problem and the fix (bad config values, missing files or
# checkpoints, a bad annotation, a busy workdir, a diverged run): shown alone, without a traceback.
_EXPLAINED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, FloatingPointError,
                     NotImplementedError)
# How a full disk shows up along an exception chain: errno ENOSPC/EDQUOT from Python's own I/O, or
# TensorStore's status text (it writes the checkpoint arrays): RESOURCE_EXHAUSTED with the OS error.
# RESOURCE_EXHAUSTED alone is also XLA's out-of-memory status, which is not a disk problem.
_DISK_FULL_MARKERS = ("No space left", "ENOSPC", "Disk quota exceeded", "OS error 28")


def _is_disk_full(e):
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  text = str(e)
  return any(marker in text for marker in _DISK_FULL_MARKERS) or (
      "RESOURCE_EXHAUSTED" in text and "memory" not in text.lower()
      and any(word in text.lower() for word in ("writ", "file", "disk")))


def _exception_chain(err):
  """err and every exception it was raised from or while handling, outermost first."""
  chain, seen = [], set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    chain.append(err)
    err = err.__cause__ or err.__context__
  return chain


def describe_failure(err, workdir=None, data_dir=None):
  """(one message naming the cause and the fix, whether a traceback helps) for an uncaught error."""
  chain = _exception_chain(err)
  # The innermost disk-full error is the first failing write; later ones are its consequences.
  for e in reversed(chain):
    if _is_disk_full(e):
      where = workdir or data_dir or "the output folder"
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
      return (f"no space left on the device holding {where} ({type(e).__name__}: "
              f"{first_line}). Free some space there "
              "(older checkpoints go with a lower config.train.keep_checkpoints) or choose a "
              "folder on a larger disk; a training run then resumes from its last complete "
              "checkpoint with the same command."), False
  from mdssd_jax.state import workdir_lock  # pylint: disable=g-import-not-at-top  (stdlib only)
  # NonFiniteLossError (run/train.py) is a FloatingPointError, so _EXPLAINED_ERRORS covers it.
  if isinstance(err, _EXPLAINED_ERRORS + (workdir_lock.WorkdirBusyError,)):
    return f"{type(err).__name__}: {err}", False
  return f"{type(err).__name__}: {err}", True


def _is_closed_event_loop_error(exc_type, exc):
  return exc_type is RuntimeError and str(exc) == "Event loop is closed"


def _hide_closed_event_loop_errors():
  """Default verbosity: the "Event loop is closed" errors of a failed asynchronous save go unshown.

  When a checkpoint write fails (a full disk), Orbax closes the save's event loop while TensorStore
  still completes the other writes; each completion posts to the closed loop, and Python prints
  that RuntimeError (through sys.excepthook, sys.unraisablehook or threading.excepthook), dozens
  of times, before the write error itself reaches the one message of `_main_reporting_errors`.
  """
  previous_hook, previous_thread_hook = sys.excepthook, threading.excepthook
  previous_unraisable_hook = sys.unraisablehook

  def hook(exc_type, exc, tb):
    if not _is_closed_event_loop_error(exc_type, exc):
      previous_hook(exc_type, exc, tb)

  def thread_hook(args):
    if not _is_closed_event_loop_error(args.exc_type, args.exc_value):
      previous_thread_hook(args)

  def unraisable_hook(args):
    if not _is_closed_event_loop_error(args.exc_type, args.exc_value):
      previous_unraisable_hook(args)

  sys.excepthook, threading.excepthook = hook, thread_hook
  sys.unraisablehook = unraisable_hook


def _main_reporting_errors(argv):
  """main(), ending any failure in ONE message (the cause and the fix) and exit status 1.

  The full traceback shows with -v, or when the error is unexpected (a bug to report). The process
  then ends with os._exit: background threads of a failed run (Orbax's asynchronous saves,
  TensorStore, Grain) would otherwise keep printing errors while the interpreter shuts down.
  """
  # (A library's error record loses its traceback at the default verbosity: the console's handler.)
  if flags.FLAGS.verbosity < 1:
    _hide_closed_event_loop_errors()
  try:
    return main(argv)
  except (app.UsageError, SystemExit, KeyboardInterrupt):
    raise
  except Exception as err:  # pylint: disable=broad-except
    # The config as main() loaded it (None if that failed): reading the flag again would raise again.
    config = _LOADED["config"]
    message, unexpected = describe_failure(
        err, workdir=_WORKDIR.value, data_dir=config.data.get("data_dir") if config else None)
    console.restore_native_output()   # the libraries' last lines first, the one message last
    if unexpected or flags.FLAGS.verbosity >= 1:
      traceback.print_exc()
      sys.stderr.write("\n")
    hint = "" if flags.FLAGS.verbosity >= 1 or unexpected else " (-v shows the full traceback)"
    sys.stderr.write(f"Error: {message}{hint}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    logging.flush()
    os._exit(1)  # pylint: disable=protected-access


def _parse_flags(argv):
  """absl's flag parsing (app.parse_flags_with_usage), a mistake ending in one `Error:` line.

  A flag error (a bad value, an unknown flag) as absl words it, without its usage text; an
  override of a config key that does not exist (ml_collections raises a KeyError inside an
  AttributeError) names the key and the closest known ones; a missing config file names the path.
  """
  argv = console.expand_bare_verbose_flag(argv)   # a bare `-v` means --verbosity=1
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    if user_errors.config_path_from_argv(argv) is None:
      user_errors.exit_with_error("--config is required, e.g. --config=configs/tiny_mdssd.py")
    user_errors.exit_with_error(f"{err} (python main.py --helpfull lists the flags)")
  except (KeyError, AttributeError) as err:
    user_errors.exit_with_error(user_errors.unknown_config_key(argv)
                                or f"{type(err).__name__}: {err}")
  except OSError as err:   # the config file, loaded to check an override's key
    message = user_errors.config_file_message(user_errors.config_path_from_argv(argv), err)
    if message is None:
      raise
    user_errors.exit_with_error(message)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(_main_reporting_errors, flags_parser=_parse_flags)
