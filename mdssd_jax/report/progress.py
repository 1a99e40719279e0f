"""What a run shows: the project's own lines, one live progress line, and a closing summary.

`say` is the one writer of the run's lines: stdout, flushed (so that piped output keeps its order),
without breaking a live bar; `Progress` is the training bar; `show_status` one live status line on
a terminal (data preparation's); `run_summary` the closing table. Setting up the process
(verbosity, which library lines get through, data workers) is the command line's job:
mdssd_jax/cli/console.py, whose logging handler writes the project's log lines through `say`.

    training:  progress = progress_lib.Progress(total_steps, start_step=step, log_every_steps=...)
               progress.update(step, loss=...); progress.close()
    end:       progress_lib.say(progress_lib.run_summary(...))
"""

import shutil
import sys
import threading
import time
from typing import Any, Callable, Dict, IO, Mapping, Optional, Tuple

from mdssd_jax.core.durations import format_duration

# The live line, if any (at most one per process): a Progress bar or a _StatusLine.
_ACTIVE: Dict[str, Any] = {"bar": None}


def clear_active_line() -> None:
  """Clears the live line (the progress bar or a status line, if any) so that another line can be
  written to the terminal; the bar redraws at its next update, a status line is gone."""
  active = _ACTIVE["bar"]
  if active is not None:
    active.clear_line()
    if isinstance(active, _StatusLine):
      _ACTIVE["bar"] = None


# ---------------------------------------------------------------------------------------------------
# Output: lines, the progress bar, a status line.
# ---------------------------------------------------------------------------------------------------

def _is_tty(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False


def say(*lines: str, stream: Optional[IO[str]] = None) -> None:
  """Prints the project's own lines (tables, the summary) on stdout without breaking a live bar."""
  stream = stream or sys.stdout
  clear_active_line()
  stream.write("\n".join(str(line) for line in lines) + "\n")
  stream.flush()


def _format_number(value: float) -> str:
  if value != value:
    return "nan"
  if value == 0 or 1e-3 <= abs(value) < 1e5:
    return f"{value:.4g}"
  return f"{value:.3e}"


class Progress:
  """A live progress line for a loop of `total_steps` steps.

  On a terminal (the stream's isatty()): one line redrawn with "\\r", at most every
  `min_redraw_interval_s`, e.g.
      train [########............]  40%  400/1000  1.52 steps/s  ETA 6m34s  loss 3.214
  Elsewhere (CI, nohup, a pipe): one plain line per `log_every_steps` steps and at the last step,
      step 400/1000 (40%)  1.52 steps/s  ETA 6m34s  loss 3.214
  steps/s counts from the first update on, so the first step's compilation does not skew it.

  Call `update(step, loss=...)` once per step (any scalars may be given by keyword, e.g. only on
  the steps where the loop fetched them; the latest value is shown), then `close()`.
  """

  def __init__(self, total_steps: int, start_step: int = 0, desc: str = "train",
               log_every_steps: int = 100, stream: Optional[IO[str]] = None,
               enabled: bool = True, min_redraw_interval_s: float = 0.1,
               clock: Callable[[], float] = time.monotonic, tty: Optional[bool] = None,
               width: Optional[int] = None):
    if total_steps <= 0:
      raise ValueError(f"Progress needs total_steps > 0, got {total_steps} "
                       "(config.train.num_steps)")
    if log_every_steps <= 0:
      raise ValueError(f"Progress needs log_every_steps > 0, got {log_every_steps} "
                       "(config.train.log_every_steps)")
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.desc = desc
    self.log_every_steps = int(log_every_steps)
    self.stream = stream or sys.stdout
    self.enabled = enabled
    self.tty = _is_tty(self.stream) if tty is None else tty
    self.min_redraw_interval_s = min_redraw_interval_s
    self.clock = clock
    self.width = width
    self.scalars: Dict[str, float] = {}
    self.step = self.start_step
    self._first: Optional[Tuple[int, float]] = None   # (step, time) of the first update
    self._last_draw = -float("inf")
    self._drawn = False        # a partial line is on the terminal
    self._lock = threading.Lock()
    if enabled:
      _ACTIVE["bar"] = self

  # ---- numbers ----
  def steps_per_second(self) -> Optional[float]:
    if self._first is None or self.step <= self._first[0]:
      return None
    elapsed = self.clock() - self._first[1]
    return (self.step - self._first[0]) / elapsed if elapsed > 0 else None

  def eta_seconds(self) -> Optional[float]:
    rate = self.steps_per_second()
    return None if not rate else (self.total_steps - self.step) / rate

  # ---- text ----
  def _fields(self) -> str:
    rate = self.steps_per_second()
    parts = [f"{rate:.3g} steps/s" if rate else "-- steps/s", f"ETA {format_duration(self.eta_seconds())}"]
    parts += [f"{k} {_format_number(v)}" for k, v in self.scalars.items()]
    return "  ".join(parts)

  def line(self) -> str:
    """The text of the current state (a bar on a terminal, plain otherwise)."""
    fraction = min(1.0, max(0.0, self.step / self.total_steps))
    digits = len(str(self.total_steps))
    if not self.tty:
      return (f"step {self.step:>{digits}}/{self.total_steps} ({100 * fraction:3.0f}%)  "
              f"{self._fields()}")
    columns = self.width or shutil.get_terminal_size((100, 20)).columns
    tail = f" {100 * fraction:3.0f}%  {self.step:>{digits}}/{self.total_steps}  {self._fields()}"
    bar_width = max(10, min(30, columns - len(self.desc) - len(tail) - 4))
    filled = int(round(bar_width * fraction))
    text = f"{self.desc} [{'#' * filled}{'.' * (bar_width - filled)}]{tail}"
    return text[:max(20, columns - 1)]

  # ---- drawing ----
  def update(self, step: int, **scalars: Optional[float]) -> None:
    """Step `step` is done; scalars (e.g. loss=2.3) are shown until newer values arrive."""
    if not self.enabled:
      return
    now = self.clock()
    with self._lock:
      self.step = int(step)
      if self._first is None:
        self._first = (self.step, now)
      for k, v in scalars.items():
        if v is not None:
          self.scalars[k] = float(v)
      last = self.step >= self.total_steps
      if self.tty:
        if last or now - self._last_draw >= self.min_redraw_interval_s:
          self.stream.write("\r\033[K" + self.line())
          self.stream.flush()
          self._drawn = True
          self._last_draw = now
      elif last or self.step % self.log_every_steps == 0:
        self.stream.write(self.line() + "\n")
        self.stream.flush()

  def clear_line(self) -> None:
    """Erases the partial bar line (before other output); the next update redraws it. The last
    step's bar has no next update: its line is ended instead, so that the final state stays."""
    if self.tty and self._drawn:
      self.stream.write("\n" if self.step >= self.total_steps else "\r\033[K")
      self.stream.flush()
      self._drawn = False
      self._last_draw = -float("inf")

  def close(self) -> None:
    """Ends the bar's line (the final state stays on screen) and detaches it from the console."""
    with self._lock:
      if self.enabled and self.tty and self._drawn:
        self.stream.write("\r\033[K" + self.line() + "\n")
        self.stream.flush()
        self._drawn = False
    if _ACTIVE["bar"] is self:
      _ACTIVE["bar"] = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _StatusLine:
  """The one live status line of `show_status` (e.g. "preparing data: generating train: 1200
  examples, 12s"), erased by the next line written through `say`."""

  def __init__(self, stream: IO[str]):
    self.stream = stream
    self.drawn = False

  def draw(self, text: str) -> None:
    columns = shutil.get_terminal_size((100, 20)).columns
    self.stream.write("\r\033[K" + text[:max(20, columns - 1)])
    self.stream.flush()
    self.drawn = True

  def clear_line(self) -> None:
    if self.drawn:
      self.stream.write("\r\033[K")
      self.stream.flush()
      self.drawn = False


def show_status(text: str, stream: Optional[IO[str]] = None) -> None:
  """On a terminal: `text` as the live line, redrawn in place until `say` writes the next line;
  elsewhere (a pipe, a file) nothing, since the final line says it all. The training bar, while it
  runs, keeps the line for itself."""
  stream = stream or sys.stdout
  active = _ACTIVE["bar"]
  if isinstance(active, Progress) or not _is_tty(stream):
    return
  if not isinstance(active, _StatusLine) or active.stream is not stream:
    if active is not None:
      active.clear_line()
    active = _ACTIVE["bar"] = _StatusLine(stream)
  active.draw(text)


# ---------------------------------------------------------------------------------------------------
# The end-of-run summary.
# ---------------------------------------------------------------------------------------------------

def _ap(value: Optional[float]) -> str:
  return "  -  " if value is None or value != value else f"{value:.3f}"


def run_summary(*, steps: int, wall_s: float, images_per_s: Optional[float],
                last_map: Optional[Tuple[int, float]], best_map: Optional[Tuple[int, float]],
                ap_by_size: Optional[Mapping[str, Optional[float]]],
                paths: Mapping[str, str], metric_name: str = "mAP@0.5",
                stopped_early: bool = False) -> str:
  """The closing table of a run, from numbers (no I/O).

  Args:
    steps: the step the run stopped at.
    wall_s: the whole command's wall time, seconds.
    images_per_s: training images per second (global batch x steps / training time), or None.
    last_map, best_map: (step, value) of the last and the best evaluation, or None (none ran).
    ap_by_size: {bucket name: AP} of the last evaluation, in display order (None/NaN: no object of
      that size), or None.
    paths: {label: path} in display order, e.g. checkpoints, pictures, plots, logs, metrics.
    metric_name: what last/best measure.
    stopped_early: the run stopped before its last step (a preemption notice).
  Returns:
    Lines like
      Done: 600 steps in 8m10s, 9.8 images/s
        mAP@0.5       last 0.767 (step 600)   best 0.767 (step 600)
        AP by size    tiny 0.612   small 0.803   medium 0.911   large   -
        checkpoints   /tmp/demo/checkpoints
  """
  speed = f", {images_per_s:.3g} images/s" if images_per_s else ""
  head = "Stopped (preempted; rerun the same command to resume)" if stopped_early else "Done"
  lines = [f"{head}: {steps} steps in {format_duration(wall_s)}{speed}"]
  labels = [metric_name, "AP by size"] + list(paths)
  width = max(len(label) for label in labels) + 2
  if last_map is not None:
    text = f"last {_ap(last_map[1])} (step {last_map[0]})"
    if best_map is not None:
      text += f"   best {_ap(best_map[1])} (step {best_map[0]})"
    lines.append(f"  {metric_name:<{width}}{text}")
  else:
    lines.append(f"  {metric_name:<{width}}no evaluation ran")
  if ap_by_size:
    cells = "   ".join(f"{name} {_ap(value)}" for name, value in ap_by_size.items())
    lines.append(f"  {'AP by size':<{width}}{cells}")
  for label, path in paths.items():
    lines.append(f"  {label:<{width}}{path}")
  return "\n".join(lines)
