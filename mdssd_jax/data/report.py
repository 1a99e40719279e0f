"""What `--mode=prepare` changed or left out, kept beside the prepared data in prepare_report.json.

Builders count every repair they make to the official annotations (boxes clipped to the image,
inverted corners) and route every annotation they cannot read through one policy,
`config.data.bad_annotations`: "error" stops at the first one with a message naming the file, the
line where the parser gives one, and the fix; "skip" leaves that image out and lists it. The report
file's layout is in docs/data_formats.md ("The prepare report").

While they generate, builders say how far they are (`with_progress`): a line per finished split,
"preparing data: generating train: 4000 examples in 31.2s", and in between status records on the
logger STATUS_LOGGER (DEBUG), which the command line's console draws as one live line on a terminal.
"""

import json
import logging
import os
import time
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional

from mdssd_jax.core.durations import format_duration

REPORT_FILE = "prepare_report.json"
POLICIES = ("error", "skip")
# How many file names a counter keeps in the report (the count itself is always exact).
MAX_FILES_LISTED = 1000

# What each counter means, for the summary printed at the end of prepare and the README.
COUNTERS = {
    "boxes_clipped": "boxes reaching outside the image, clipped to it",
    "boxes_inverted": ("boxes with xmin > xmax or ymin > ymax, stored with zero width or height "
                       "(the input pipeline drops them)"),
    "boxes_degenerate_dropped": "boxes of zero size after clipping, left out",
    "objects_other_classes": "objects of classes outside the chosen list, left out",
}

# What a builder that reads a user's files tallies per split, so that the report adds up to the
# files: images_in_files = images_stored + images_skipped, boxes_in_files = boxes_stored +
# boxes_skipped (with their images or alone) + boxes_degenerate_dropped.
TOTALS = ("images_in_files", "images_stored", "images_skipped", "boxes_in_files", "boxes_stored",
          "boxes_skipped")

# The logger of the live status records, and how often a split's generation sends one.
STATUS_LOGGER = "mdssd_jax.status"
STATUS_EVERY_S = 0.5


def with_progress(generators: Mapping[str, Iterable[Any]]) -> Dict[str, Iterator[Any]]:
  """A builder's {split: example generator}, each telling how far it got (for `_split_generators`).

  TFDS generates the splits one after the other: each logs one INFO line when it is done and, at
  most every STATUS_EVERY_S, a status record (DEBUG on STATUS_LOGGER: hidden unless a handler asks
  for them, as the console does at verbosity 0).
  """
  return {split: _counted(split, examples) for split, examples in generators.items()}


def _counted(split, examples, clock=time.monotonic):
  status = logging.getLogger(STATUS_LOGGER)
  start = last = clock()
  count = 0
  for example in examples:
    yield example
    count += 1
    now = clock()
    if now - last >= STATUS_EVERY_S:
      last = now
      status.debug("preparing data: generating %s: %d examples, %s", split, count,
                   format_duration(now - start, tenths_below_a_minute=True))
  logging.info("preparing data: generating %s: %d examples in %s", split, count,
               format_duration(clock() - start, tenths_below_a_minute=True))


def check_policy(bad_annotations: str) -> str:
  if bad_annotations not in POLICIES:
    raise ValueError(f"config.data.bad_annotations={bad_annotations!r}; use 'error' (stop at the "
                     "first annotation that cannot be read) or 'skip' (leave such images out, "
                     f"listed in {REPORT_FILE})")
  return bad_annotations


class BadAnnotation(ValueError):
  """An annotation that cannot be read: names the file (and the line, when known) and the fix."""

  def __init__(self, file: str, problem: str, fix: str, line: Optional[int] = None):
    self.file, self.problem, self.fix, self.line = file, problem, fix, line
    where = f"{file}, line {line}" if line else file
    super().__init__(
        f"{where}: {problem}. Fix: {fix}; or set --config.data.bad_annotations=skip to leave such "
        f"images out (they are counted, and listed in {REPORT_FILE} beside the prepared data).")


class PrepareReport:
  """Counts and skipped annotations of one builder's preparation, per split."""

  def __init__(self, bad_annotations: str = "error"):
    self.bad_annotations = check_policy(bad_annotations)
    self.splits: Dict[str, Dict[str, Any]] = {}
    self.notes = []

  def _split(self, split):
    return self.splits.setdefault(split, {"skipped": [], "counts": {}, "files": {}})

  def bad(self, split: str, error: BadAnnotation) -> None:
    """Raises `error` under the "error" policy; records and logs it under "skip"."""
    if self.bad_annotations == "error":
      raise error
    entry = {"file": error.file, "problem": error.problem}
    if error.line:
      entry["line"] = error.line
    self._split(split)["skipped"].append(entry)
    logging.warning("skipped (config.data.bad_annotations=skip): %s%s: %s", error.file,
                    f", line {error.line}" if error.line else "", error.problem)

  def count(self, split: str, what: str, file: str, n: int = 1) -> None:
    """Adds n to counter `what` (a COUNTERS key) and lists `file` under it."""
    if n <= 0:
      return
    assert what in COUNTERS, what
    s = self._split(split)
    s["counts"][what] = s["counts"].get(what, 0) + int(n)
    files = s["files"].setdefault(what, [])
    if len(files) < MAX_FILES_LISTED and (not files or files[-1] != file):
      files.append(file)

  def tally(self, split: str, what: str, n: int = 1) -> None:
    """Adds n to the split's total `what` (a TOTALS key): what the files hold and what was kept."""
    assert what in TOTALS, what
    totals = self._split(split).setdefault("totals", {})
    totals[what] = totals.get(what, 0) + int(n)

  def note(self, text: str) -> None:
    """A line the prepare prints and keeps (e.g. how the evaluation images were chosen)."""
    self.notes.append(text)

  def as_dict(self, tfds_name: str, examples: Mapping[str, int]) -> Dict[str, Any]:
    splits = {}
    for split in sorted(set(self.splits) | set(examples)):
      s = self._split(split)
      splits[split] = {"examples": int(examples.get(split, 0)), "skipped": s["skipped"],
                       **{what: s["counts"].get(what, 0) for what in COUNTERS},
                       "files": s["files"]}
      if "totals" in s:
        splits[split]["totals"] = {what: s["totals"].get(what, 0) for what in TOTALS}
    out = {"dataset": tfds_name, "bad_annotations": self.bad_annotations, "splits": splits}
    if self.notes:
      out["notes"] = list(self.notes)
    return out


def for_builder(builder) -> PrepareReport:
  """The report a builder writes into while generating (a default "error" one if none was set)."""
  if getattr(builder, "prepare_report", None) is None:
    builder.prepare_report = PrepareReport()
  return builder.prepare_report


def write(data_path: str, report: Mapping[str, Any]) -> str:
  path = os.path.join(os.fspath(data_path), REPORT_FILE)
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  return path


def read(data_path: str) -> Optional[Dict[str, Any]]:
  """The report of prepared data, or None (prepared before reports existed, or generated data)."""
  path = os.path.join(os.fspath(data_path), REPORT_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def summary(report: Mapping[str, Any]) -> str:
  """One line per split with anything to say, e.g. "train: 2 bad annotations skipped, ..."."""
  lines = [f"  {note}" for note in report.get("notes", ())]
  for split, s in sorted(report["splits"].items()):
    parts = []
    if "totals" in s:
      t = s["totals"]
      parts.append(f"{t['images_stored']} of {t['images_in_files']} images and {t['boxes_stored']} "
                   f"of {t['boxes_in_files']} boxes stored")
    if s["skipped"]:
      parts.append(f"{len(s['skipped'])} bad annotation(s) skipped")
    parts += [f"{s[what]} {text}" for what, text in COUNTERS.items() if s.get(what)]
    if parts:
      lines.append(f"  {split}: " + "; ".join(parts))
  return "\n".join(lines)
