"""Does `--mode=coverage --suggest` help the detector, not just the coverage? The CPU demo, seed for seed.

    nice -n 19 python -m benchmarks.anchor_suggest_demo             # 2 variants x 3 seeds (resumable)
    python -m benchmarks.anchor_suggest_demo --table                 # the docs/coverage.md table from the JSON
    python -m benchmarks.anchor_suggest_demo --quick --out=/tmp/q.json --workdir=/tmp/q   # toy size

(from the repository root). Two variants of configs/demo_synthetic.py, everything else the same:
"shipped" (its default boxes) and "suggested" (the default boxes `anchor_design.suggest` finds on its
training split with seed 0, the search `--mode=coverage --suggest` prints; computed once and kept in
the JSON). Each run is `python main.py --config=configs/demo_synthetic.py --workdir=... --config.seed=S`
in a child process (the same command a user runs), seeds interleaved so that a partial comparison is
already paired; a run's final VOC evaluation (mAP and AP by size, config.eval.size_buckets_px) is
appended to the JSON as soon as it finishes, and a rerun skips finished runs (and resumes a stopped
one from its checkpoint).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from benchmarks import study_small_objects as study

DEFAULT_OUT = os.path.join("benchmarks", "results", "anchor_suggest_demo.json")
DEFAULT_WORKDIR = "/tmp/anchor_suggest_demo"
CONFIG = "configs/demo_synthetic.py"
VARIANTS = ("shipped", "suggested")
SEEDS = (0, 1, 2)
SUGGEST_SEED = 0
# --quick: the machinery at toy size (a narrow model, a handful of steps and images).
QUICK_FLAGS = ("--config.train.num_steps=4", "--config.train.warmup_steps=1",
               "--config.train.lr_decay_steps=(2,3)", "--config.train.log_every_steps=2",
               "--config.train.checkpoint_every_steps=2", "--config.model.width_multiplier=0.03125",
               "--config.data.synthetic.num_train=16", "--config.data.synthetic.num_test=4",
               "--config.train.global_batch_size=2", "--config.train.reference_batch_size=2",
               "--config.evals.voc.every_steps=2", "--config.evals.voc.num_pictures=0",
               "--config.eval.batch_size=4", "--config.data.num_workers=0")


def _config(quick):
  """The demo config with --quick's overrides (for the suggestion's data and the step count)."""
  from configs import demo_synthetic  # pylint: disable=g-import-not-at-top
  c = demo_synthetic.get_config()
  if quick:
    c.train.num_steps = 4
    c.data.synthetic.num_train = 16
    c.data.synthetic.num_test = 4
    c.data.num_workers = 0
  return c


def _commit():
  try:
    return subprocess.run(["git", "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def _cpu():
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or None


def compute_suggestion(quick):
  """{"flags": [...], "min_sizes", "max_sizes", "aspect_ratios", "coverage": {...}, "search_s"}."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mdssd_jax.run import anchor_coverage  # pylint: disable=g-import-not-at-top
  from mdssd_jax.run import anchor_design  # pylint: disable=g-import-not-at-top
  from mdssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _config(quick)
  spec = anchor_design.AnchorSpec.from_config(config.anchors, config.model.input_size_px)
  gt, sizes = anchor_coverage.boxes_from_batches(pipeline.make_eval_batches(config, split=config.data.train_split))
  gt_norm = [np.asarray(b).reshape(-1, 4) / np.array([w, h, w, h]) for b, (h, w) in zip(gt, sizes)]
  start = time.time()
  result = anchor_design.suggest(gt_norm, spec, iou_threshold=float(config.loss.iou_threshold),
                                 rule=str(config.loss.matching),
                                 buckets=anchor_coverage.buckets_from_config(config), seed=SUGGEST_SEED)
  rows = lambda report: {r["name"]: {k: r[k] for k in ("count", "covered_share", "matched_share",
                                                       "mean_positives", "mean_best_iou")}
                         for r in report["buckets"] if r["count"]}
  print(anchor_design.format_comparison(result.before, result.after), flush=True)
  return dict(flags=result.spec.flag_list(), min_sizes=list(result.spec.min_sizes),
              max_sizes=list(result.spec.max_sizes),
              aspect_ratios=[list(r) for r in result.spec.aspect_ratios],
              coverage={"shipped": rows(result.before), "suggested": rows(result.after)},
              search_s=round(time.time() - start, 1))


def run_name(variant, seed):
  return f"{variant}_seed{seed}"


def train(variant, seed, results, workdir, quick):
  """One `main.py` training run in a child process; returns (exit code, wall seconds)."""
  run_dir = os.path.join(workdir, run_name(variant, seed))
  cmd = [sys.executable, "main.py", f"--config={CONFIG}", f"--workdir={run_dir}", f"--config.seed={seed}"]
  cmd += list(QUICK_FLAGS) if quick else []
  if variant == "suggested":
    cmd += results["suggestion"]["flags"]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.abspath(workdir), "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  print(f"== {run_name(variant, seed)}: {' '.join(cmd[1:])}", flush=True)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  start = time.time()
  code = subprocess.run(cmd, cwd=root, env=env, check=False).returncode
  return code, time.time() - start


def run_all(out, workdir, quick):
  results = study.load_results(out)
  results.pop("recipe", None)
  results.pop("budget", None)
  config = _config(quick)
  demo = {"config": CONFIG, "num_steps": int(config.train.num_steps), "quick": bool(quick)}
  if results.get("demo") not in (None, demo):
    raise ValueError(f"{out} holds runs of another demo ({results['demo']}, this one: {demo}): pass "
                     "another --out or move the file away")
  results["demo"] = demo
  results.setdefault("machine", {"cpu": _cpu(), "cores": os.cpu_count()})
  results.setdefault("commit", _commit())
  if not results.get("suggestion"):
    results["suggestion"] = compute_suggestion(quick)
  study.save_results(out, results)
  print("suggested: " + " ".join(results["suggestion"]["flags"]), flush=True)
  done = {(r["variant"], r["seed"]) for r in results["runs"]}
  for seed in SEEDS[:1] if quick else SEEDS:
    for variant in VARIANTS:
      if (variant, seed) in done:
        continue
      code, wall_s = train(variant, seed, results, workdir, quick)
      if code != 0:
        raise RuntimeError(f"{run_name(variant, seed)} failed (exit code {code}); rerun to resume")
      run_dir = os.path.join(workdir, run_name(variant, seed))
      curve = study.read_curve(run_dir)
      if not curve or curve[-1]["step"] != demo["num_steps"]:
        raise RuntimeError(f"{run_dir} has no evaluation at step {demo['num_steps']}")
      results = study.load_results(out)
      results["runs"].append(dict(variant=variant, seed=seed, steps=demo["num_steps"],
                                  wall_s=round(wall_s, 1), commit=_commit(),
                                  ap={k: curve[-1][k] for k in ("all",) + study.BUCKETS},
                                  curve=curve))
      study.save_results(out, results)
      last = curve[-1]
      print(f"== {run_name(variant, seed)}: mAP {last['all']:.3f}, tiny AP {last['tiny']}, "
            f"{wall_s / 60:.1f} min", flush=True)
  return results


def table(results):
  """Markdown: mean ± std over seeds per variant, the paired differences, and the coverage."""
  keys = ("all",) + study.BUCKETS
  lines = ["| default boxes | seeds | mAP | AP tiny | AP small | AP medium | min / run |",
           "|---|---|---|---|---|---|---|"]
  by_variant = {v: sorted((r for r in results["runs"] if r["variant"] == v), key=lambda r: r["seed"])
                for v in VARIANTS}
  for variant, runs in by_variant.items():
    if not runs:
      continue
    cells = [study._fmt(*study._mean_std([r["ap"][k] for r in runs])) for k in keys]  # pylint: disable=protected-access
    minutes = sum(r["wall_s"] for r in runs) / len(runs) / 60
    lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + f" | {minutes:.1f} |")
  paired = sorted({r["seed"] for r in by_variant["shipped"]} & {r["seed"] for r in by_variant["suggested"]})
  if paired:
    ap = lambda v, s, k: next(r["ap"][k] for r in by_variant[v] if r["seed"] == s)
    diffs = {k: [ap("suggested", s, k) - ap("shipped", s, k) for s in paired
                 if ap("suggested", s, k) is not None and ap("shipped", s, k) is not None] for k in keys}
    cells = [study._fmt(*study._mean_std(diffs[k])) for k in keys]  # pylint: disable=protected-access
    lines.append(f"| suggested - shipped, same seed | {len(paired)} | " + " | ".join(cells) + " | |")
  cov = (results.get("suggestion") or {}).get("coverage")
  if cov:
    lines += ["", "| size | boxes | best IoU >= 0.5 shipped -> suggested | matched shipped -> suggested | "
              "default boxes / box | mean best IoU |", "|---|---|---|---|---|---|"]
    for name, before in cov["shipped"].items():
      after = cov["suggested"][name]
      lines.append(f"| {name} | {before['count']} | {100 * before['covered_share']:.1f}% -> "
                   f"{100 * after['covered_share']:.1f}% | {100 * before['matched_share']:.1f}% -> "
                   f"{100 * after['matched_share']:.1f}% | {before['mean_positives']:.2f} -> "
                   f"{after['mean_positives']:.2f} | {before['mean_best_iou']:.3f} -> {after['mean_best_iou']:.3f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
  parser.add_argument("--quick", action="store_true", help="toy size, one seed (tests the machinery)")
  parser.add_argument("--table", action="store_true", help="only print the table from the JSON")
  args = parser.parse_args()
  results = study.load_results(args.out) if args.table else run_all(args.out, args.workdir, args.quick)
  print(table(results))


if __name__ == "__main__":
  main()
