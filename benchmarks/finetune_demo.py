"""Fine-tuning against training from scratch on a data set of one's own, with other classes.

The source: the CPU demo (configs/demo_synthetic.py: 1/8-width MDSSD at 192 px, six shapes) trained
for --source_steps. The target: a data set a user might bring, written as a COCO JSON export (other
images: another generator seed; other classes: the six shapes grouped into three, "round" = circle
+ ring, "square-ish" = square + diamond, "pointed" = triangle + plus), prepared through
`config.data.name = "custom"`. The same target run is trained twice with the demo's recipe,
`--steps` steps each: from the demo's checkpoint (config.model.init_from; every layer but the class
heads loaded) and from scratch, each evaluated every --eval_every steps (COCO's metrics: the source
is COCO JSON). Results, evaluation by evaluation, go to benchmarks/results/finetune_demo.json; the
table in docs/your_data.md is printed from that file with --table.

  python -m benchmarks.finetune_demo                       # ~25 min on 2 cores
  python -m benchmarks.finetune_demo --table
"""

import argparse
import json
import os
import time

from benchmarks.bench_core import cpu_model
from configs import common
from configs import demo_synthetic
from mdssd_jax.data import prepare
from mdssd_jax.data import registry
from mdssd_jax.run import train
from tests import custom_formats

RESULTS = os.path.join(os.path.dirname(__file__), "results", "finetune_demo.json")
GROUPS = {"circle": "round", "ring": "round", "square": "square-ish", "diamond": "square-ish",
          "triangle": "pointed", "plus": "pointed"}
TARGET_CLASSES = ("round", "square-ish", "pointed")


def write_target(root, data_dir, num_train, num_test):
  """The target data set as a COCO JSON export; returns the config.data.custom overrides."""
  config = demo_synthetic.get_config()
  config.data.data_dir = data_dir
  config.data.synthetic.seed = 777            # other images than the demo's
  config.data.synthetic.num_train = num_train
  config.data.synthetic.num_test = num_test
  info = registry.get_dataset(config.data)
  ids = {name: k + 1 for k, name in enumerate(TARGET_CLASSES)}
  overrides = {}
  for split, name in (("train", "train"), ("test", "val")):
    records = custom_formats.records_of(registry.open_split(info, data_dir, split))
    grouped = [dict(r, labels=[TARGET_CLASSES.index(GROUPS[info.class_names[l]]) for l in r["labels"]])
               for r in records]
    path = os.path.join(root, "target", "annotations", f"{name}.json")
    custom_formats.write_coco(grouped, TARGET_CLASSES, path, os.path.join(root, "target", name),
                              [ids[c] for c in TARGET_CLASSES])
    key = "train" if split == "train" else "eval"
    overrides[key] = path
    overrides[f"{key}_images"] = os.path.join(root, "target", name)
  return overrides


def target_config(data_dir, custom, steps, eval_every, init_from, seed):
  c = demo_synthetic.get_config()
  c.seed = seed
  c.data.data_dir = data_dir
  c.data.name = "custom"
  c.data.eval_split = "validation"
  c.model.num_classes = 0
  for key, value in custom.items():
    c.data.custom[key] = value
  c.evals.voc = common.data_eval(every_steps=eval_every)   # COCO's metrics for a COCO JSON source
  c.eval.best_metric = "voc/auto"
  c.train.num_steps = steps
  c.train.lr_decay_steps = (int(steps * 0.75), int(steps * 11 / 12))
  c.train.checkpoint_every_steps = eval_every
  c.model.init_from = init_from
  return c


def _evaluations(workdir):
  with open(os.path.join(workdir, "eval_results.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [{k: row[k] for k in ("step", "AP", "AP50", "AP_small", "AP_size/tiny") if k in row}
          for row in rows if row.get("mode") == "train"]


def run(args):
  root = os.path.abspath(args.workdir)
  data_dir = os.path.join(root, "tfds")
  source = demo_synthetic.get_config()
  source.data.data_dir = data_dir
  source.train.num_steps = args.source_steps
  start = time.time()
  train.train_and_evaluate(source, os.path.join(root, "source"))
  source_s = time.time() - start
  custom = write_target(root, data_dir, args.num_train, args.num_test)
  results = {"machine": cpu_model(), "cpus": os.cpu_count(), "source_steps": args.source_steps,
             "source_seconds": round(source_s), "target": {"classes": list(TARGET_CLASSES),
                                                          "groups": GROUPS, "num_train": args.num_train,
                                                          "num_test": args.num_test},
             "steps": args.steps, "runs": {}}
  for seed in range(args.seeds):
    for name, init_from in (("fine-tuned", os.path.join(root, "source")), ("scratch", "")):
      config = target_config(data_dir, custom, args.steps, args.eval_every, init_from, seed)
      if name == "fine-tuned" and seed == 0:
        prepare.prepare(config)
      workdir = os.path.join(root, f"{name}_seed{seed}")
      start = time.time()
      train.train_and_evaluate(config, workdir)
      results["runs"][f"{name}/seed{seed}"] = {"seconds": round(time.time() - start),
                                                "evaluations": _evaluations(workdir)}
      os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
      with open(RESULTS, "w") as f:
        json.dump(results, f, indent=1)
  return results


def table(results):
  """The Markdown table of docs/your_data.md: COCO AP (and AP50) per evaluation, per run."""
  runs = results["runs"]
  steps = [e["step"] for e in next(iter(runs.values()))["evaluations"]]
  lines = [f"Target: {results['target']['num_train']} training and {results['target']['num_test']} "
           f"test images, classes {', '.join(results['target']['classes'])}; source: the demo after "
           f"{results['source_steps']} steps; {results['machine']}, {results['cpus']} CPUs.", "",
           "| run | " + " | ".join(f"step {s}" for s in steps) + " |",
           "|---|" + "---|" * len(steps)]
  for name, run_result in runs.items():
    by_step = {e["step"]: e for e in run_result["evaluations"]}
    cells = [f"{by_step[s]['AP']:.3f} ({by_step[s]['AP50']:.3f})" if s in by_step else "-"
             for s in steps]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append("COCO AP@[.5:.95] (AP50 in brackets) on the target's test images.")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/finetune_demo")
  parser.add_argument("--source_steps", type=int, default=800)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--eval_every", type=int, default=50)
  parser.add_argument("--num_train", type=int, default=400)
  parser.add_argument("--num_test", type=int, default=200)
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--table", action="store_true", help="print the table of the results file")
  args = parser.parse_args()
  if args.table:
    with open(RESULTS) as f:
      print(table(json.load(f)))
    return
  print(table(run(args)))


if __name__ == "__main__":
  main()
