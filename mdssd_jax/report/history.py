"""The run's evaluation record, WORKDIR/eval_results.jsonl: one JSON line per evaluation.

Written by the caller of the evaluators (run/evaluate.py), read for the AP-by-step plot and the run
summary. A line cut by a crash is skipped on append and the next line starts whole.
"""

import json
import os
from typing import Any, Dict, List, Mapping

EVAL_RESULTS_FILE = "eval_results.jsonl"


def read_eval_history(jsonl_path: str) -> List[Dict[str, Any]]:
  """The lines of WORKDIR/eval_results.jsonl (one dict per evaluation); [] when there is none."""
  if not os.path.exists(jsonl_path):
    return []
  history = []
  with open(jsonl_path) as f:
    for number, line in enumerate(f, start=1):
      line = line.strip()
      if not line:
        continue
      try:
        history.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{jsonl_path} line {number} is not JSON ({e}); delete or fix that line") from e
  return history


def append_result(path: str, record: Mapping[str, Any]) -> bool:
  """Appends `record` as one JSON line unless a line of the same step, evaluator and mode exists.

  A run killed between its evaluation and its checkpoint evaluates that step again on resume: the
  second, identical line is not written. Returns whether a line was written.
  """
  key = (record["step"], record["evaluator"], record["mode"])
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          old = json.loads(line)
        except ValueError:
          continue   # a line cut by a crash mid-write: ignored, the next append is whole
        if (old.get("step"), old.get("evaluator"), old.get("mode")) == key:
          return False
  with open(path, "a+") as f:
    f.seek(0, os.SEEK_END)
    if f.tell():   # after a line cut by a crash, start a new one
      f.seek(f.tell() - 1)
      cut = f.read(1) != "\n"
      f.seek(0, os.SEEK_END)
      if cut:
        f.write("\n")
    f.write(json.dumps(record) + "\n")
  return True
