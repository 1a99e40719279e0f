"""The command line's own mistakes in one line: an unknown config key, a config file that is not there.

ml_collections reports both as chained tracebacks (a KeyError inside an AttributeError raised while
absl parses the flags, or an IOError "Failed loading config file config_config"); these functions
turn them into one sentence that names the key or the path and the fix, for main.py's `Error:` line.
Flag parsing has not finished when they run, so they read the raw command line.
"""

import difflib
import importlib.util
import os
import sys
from typing import Iterator, List, Optional, Sequence, Tuple

_CONFIG_FLAG = "config"
# How many close matches an unknown key names.
_MAX_SUGGESTIONS = 3


def config_path_from_argv(argv: Sequence[str]) -> Optional[str]:
  """The file of --config=FILE (or --config FILE) on a raw command line (the last one), or None.

  A config file may take an argument after a colon (`configs/x.py:arg`); it is cut off.
  """
  path = None
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    for name in (f"--{_CONFIG_FLAG}", f"-{_CONFIG_FLAG}"):
      if arg.startswith(name + "="):
        path = arg[len(name) + 1:]
      elif arg == name and i + 1 < len(args):
        path = args[i + 1]
  return path.split(":", 1)[0] if path else None


def override_keys(argv: Sequence[str]) -> Iterator[Tuple[str, str]]:
  """(dotted key below config, the argument as typed) of each --config.KEY[=VALUE] override."""
  for arg in argv[1:]:
    if arg == "--":
      break
    name = arg.lstrip("-").split("=", 1)[0]
    if name.startswith("no" + _CONFIG_FLAG + "."):   # --noconfig.model.batch_norm (a bool off)
      name = name[2:]
    if arg.startswith("-") and name.startswith(_CONFIG_FLAG + "."):
      yield name[len(_CONFIG_FLAG) + 1:], arg


def load_config(path: str):
  """get_config() of a config file, loaded as ml_collections does (by path, not as a package)."""
  spec = importlib.util.spec_from_file_location("mdssd_user_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _is_node(value) -> bool:
  return hasattr(value, "keys") and hasattr(value, "__getitem__")


def config_keys(config, prefix: str = "") -> List[str]:
  """Every dotted key of a (nested) config, sections included: ["train", "train.num_steps", ...]."""
  keys = []
  for key in config.keys():
    name = f"{prefix}{key}"
    keys.append(name)
    if _is_node(config[key]):
      keys += config_keys(config[key], name + ".")
  return keys


def _has_key(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not _is_node(node) or part not in node:
      return False
    node = node[part]
  return True


def closest_keys(unknown: str, known: Sequence[str]) -> List[str]:
  """Up to _MAX_SUGGESTIONS known keys closest to `unknown`: by the whole dotted name, then any key
  ending in the same field (a key that moved to another section, e.g. eval.every_steps)."""
  close = difflib.get_close_matches(unknown, known, n=_MAX_SUGGESTIONS, cutoff=0.6)
  leaf = unknown.rsplit(".", 1)[-1]
  same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf and k not in close]
  return (close + same_leaf)[:_MAX_SUGGESTIONS]


def unknown_config_key(argv: Sequence[str]) -> Optional[str]:
  """The message for the first --config.KEY override that names no field of the config file, or
  None (no config file on the command line, it does not load, or every key exists)."""
  path = config_path_from_argv(argv)
  if not path or not os.path.isfile(path):
    return None
  try:
    config = load_config(path)
  except Exception:  # pylint: disable=broad-except  (the file's own error is reported elsewhere)
    return None
  for key, arg in override_keys(argv):
    if not _has_key(config, key):
      suggestions = closest_keys(key, config_keys(config))
      hint = (f"; the closest known: {', '.join('config.' + k for k in suggestions)}"
              if suggestions else f"; configs/common.py lists the keys")
      return f"unknown config key config.{key} ({arg}) in {path}{hint}"
  return None


def config_file_message(path: Optional[str], error: BaseException) -> Optional[str]:
  """The message for a config file that does not exist, or None when `error` is another failure
  (a bug inside the file: its traceback is the useful report)."""
  missing = isinstance(error, FileNotFoundError) or isinstance(
      getattr(error, "__cause__", None), FileNotFoundError) or "No such file" in str(error)
  if not missing:
    return None
  shown = path or "(none given)"
  return (f"the config file {shown} does not exist (a relative path starts in {os.getcwd()}); "
          f"pass one of configs/*.py, e.g. --config=configs/tiny_mdssd.py")


def exit_with_error(message: str) -> None:
  """Writes the one `Error:` line and exits with status 1 (used before the console is set up)."""
  sys.stdout.flush()
  sys.stderr.write(f"Error: {message}\n")
  sys.stderr.flush()
  sys.exit(1)
