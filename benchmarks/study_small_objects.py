"""The small-object study: does MDSSD's Fusion Block help small objects, seed for seed?

    python -m benchmarks.study_small_objects                  # the full study (resumable)
    python -m benchmarks.study_small_objects --table          # docs/study.md tables + plot from the JSON
    python -m benchmarks.study_small_objects --ablation       # the branch ablation alone
    python -m benchmarks.study_small_objects --quick --out=/tmp/q/study.json --workdir=/tmp/q
    python -m benchmarks.study_small_objects --settled --workers=2   # the settled study (resumable)
    python -m benchmarks.study_small_objects --settled --table       # its tables + plot
    python -m benchmarks.study_small_objects --context --workers=2   # the context study's sweep
    python -m benchmarks.study_small_objects --context --steps=2400 --workers=2   # its long runs
    python -m benchmarks.study_small_objects --context --table       # its tables + plot + examples

(from the repository root). Every detector is the CPU demo's (configs/demo_synthetic.py: VGG16
trunk with batch norm, 192 px input) on the generated small-object data, trained with the same
optimiser, schedule, data and seeds; only the part after the trunk differs:

  ssd                SSD: heads on conv4_3 (L2Norm), conv7 and the extra layers; default boxes from
                     20 px up (the demo's ladder without its finest rung).
  ssd_fine           ssd plus a head on the raw conv3_3 map (4 px stride) with MDSSD's finest
                     default boxes (10-20 px): the same heads and default boxes as the MDSSD variants,
                     without fusion. It separates "finer default boxes" from "fusion".
  mdssd              MDSSD with the paper's Fusion Block (no batch norm inside it; the trunk keeps
                     its batch norm: config.model.fusion_batch_norm=False).
  mdssd_bn           MDSSD with batch norm after every conv and deconv of the Fusion Block, as
                     DSSD's deconvolution module (fusion_batch_norm=True).
  mdssd_bn_shallow   mdssd_bn's Fusion Blocks without their deep (deconvolution) branch
                     (config.model.fusion_deep_branch=False): the train-time control that separates
                     the deep map's semantics from a deeper fine head.
  mdssd_bn_bilinear  mdssd_bn whose deconvs start as interpolating upsamplers
                     (fusion_deconv_init="bilinear", FCN's and DSSD's start). Not in the full
                     study's plan (it does not fit its two hours); --variants=... adds it.

Two regimes: "scratch" (everything random) and "trained_trunk", which mirrors the paper's ImageNet
start: the VGG16 trunk (weights and batch-norm statistics) is copied from the finished `ssd` run of
the same seed, everything after it starts fresh, so the fusion is measured apart from the trunk's
training.

Each run trains in a child process into its own folder under --workdir (checkpoints:
train_and_evaluate resumes there) and is appended to the --out JSON as soon as it finishes; a rerun
skips finished runs and resumes unfinished ones. --workers=N trains N runs side by side, each pinned
to a core: for machines with more cores than one small run keeps busy (on this project's 2-core CPU,
two workers train at 1.1 steps/s each where one run alone trains at 2.2: no gain but overlapped
compiles and evaluations). SIGTERM checkpoints the running runs and stops the study (a kill -9 loses
at most the steps since each run's last checkpoint).
The study ends with a test-time ablation of every finished MDSSD run (`branch_ablation`: the deep
or the shallow branch of every Fusion Block switched off; --ablation runs it alone).
--table rebuilds the markdown tables and the learning-curve plot from the JSON alone.

The settled study (--settled, results in benchmarks/results/study_settled.json) gives every variant
its own learning rate: each is trained on the first seed at every rate of SETTLED.lrs, the rate
with the best validation mAP@0.5 on 200 generated training images held out of training is chosen,
and the other seeds train at it. Its tables add the sweep, the chosen rate, how much test mAP still
moved over the last quarter of the steps, and the three comparisons of COMPARISONS with their sizes
against the seeds' spread.

The context study (--context, results in benchmarks/results/study_context*.json) is the settled
study's method on the context data (synthetic.context=True): a tiny object's class is its shape and
the texture of a scene marker beyond the shallow heads' view. Its tables add, per variant, the share
of tiny-object detections that name the right shape in the wrong scene (`tiny_confusion`), and the
ablation the same with each branch off; --table also draws docs/study_context_examples.png.
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np

DEFAULT_OUT = os.path.join("benchmarks", "results", "study_small_objects.json")
DEFAULT_PLOT = os.path.join("benchmarks", "study_small_objects.png")
DEFAULT_WORKDIR = "/tmp/study_small_objects"
EVALUATOR = "voc"
VAL_EVALUATOR = "val"   # the held-out training images of the settled study
# The size buckets the study reports (names of config.eval.size_buckets_px).
BUCKETS = ("tiny", "small", "medium")

# variant -> (family, config.model overrides on top of the family's layout).
VARIANTS = {
    "ssd": ("ssd", {}),
    "ssd_fine": ("ssd_fine", {}),
    "mdssd": ("mdssd", dict(fusion_batch_norm=False, fusion_deconv_init="xavier")),
    "mdssd_bn": ("mdssd", dict(fusion_batch_norm=True, fusion_deconv_init="xavier")),
    "mdssd_bn_bilinear": ("mdssd", dict(fusion_batch_norm=True, fusion_deconv_init="bilinear")),
    # The train-time control: mdssd_bn's Fusion Blocks without their deep (deconvolution) branch,
    # the same shallow path, heads and default boxes. mdssd_bn against it isolates the deep map's
    # semantics; it against ssd_fine, the deeper fine head (two conv + BN layers more).
    "mdssd_bn_shallow": ("mdssd", dict(fusion_batch_norm=True, fusion_deconv_init="xavier",
                                       fusion_deep_branch=False)),
}
# The trained-trunk regime compares the detectors that share heads and default boxes; the trunk
# comes from this variant's scratch run of the same seed.
TRUNK_SOURCE = "ssd"
TRAINED_TRUNK_VARIANTS = ("ssd_fine", "mdssd", "mdssd_bn", "mdssd_bn_bilinear", "mdssd_bn_shallow")
TRUNK_PARAMS = "vgg"   # the VGG16 trunk's name in the params and batch_stats trees


@dataclasses.dataclass(frozen=True)
class Budget:
  """How big the study is. The full one is sized for about two hours of a loaded 2-core CPU."""
  steps: int                      # training steps of a run from scratch
  trained_trunk_steps: int        # training steps of a run whose trunk starts trained
  eval_every_steps: int           # learning-curve resolution
  seeds: tuple
  width_multiplier: float
  num_train: int                  # generated training images (cycled)
  num_test: int                   # generated test images (every evaluation uses all)
  batch_size: int
  variants: tuple = tuple(VARIANTS)
  trained_trunk_variants: tuple = TRAINED_TRUNK_VARIANTS
  data: tuple = ("shape",)        # "shape": colour_by_class=False; "colour": the demo's hues
  # The settled study (--settled): each variant at its own learning rate. `lrs` are swept on the
  # first seed, the rate with the best validation mAP@0.5 is chosen per variant, and the other
  # seeds train at it. () = every run at the recipe's rate (the first study).
  lrs: tuple = ()
  # Or one rate per variant, ((variant, lr), ...), every seed at it: the settled study's chosen rates
  # at another number of steps (--settled --steps=N).
  variant_lrs: tuple = ()
  # Images held out of the num_train generated training images as the validation split the rate
  # is chosen on ("train[N-val:]"; the runs train on "train[:N-val]"); 0 = none.
  val_images: int = 0


SIZE_KEYS = ("steps", "trained_trunk_steps", "eval_every_steps", "width_multiplier", "num_train", "num_test", "batch_size")
# Keys of the settled study's budget, in its results file only (the first study's file predates them).
SETTLED_KEYS = ("lrs", "variant_lrs", "val_images")
# The schedule every study run stretches to its steps: the CPU demo's of the studies' time (600 steps,
# warm-up 50, decays at 450 and 550; the demo itself has since moved to 800 steps), kept here so that
# the recipe stays the one the results files record.
STUDY_SCHEDULE = dict(num_steps=600, warmup_steps=50, lr_decay_steps=(450, 550))
# The validation metric a variant's learning rate is chosen on: mAP@0.5 over all sizes, so that the
# choice does not look at the tiny-object AP the verdict compares.
SELECT_ON = "all"

# 12 scratch runs of 600 steps and 9 trained-trunk runs of 300 (docs/study.md, "The small-object study").
FULL = Budget(steps=600, trained_trunk_steps=300, eval_every_steps=100, seeds=(0, 1, 2),
              width_multiplier=1 / 8, num_train=4000, num_test=200, batch_size=8,
              variants=("ssd", "ssd_fine", "mdssd", "mdssd_bn"),
              trained_trunk_variants=("ssd_fine", "mdssd", "mdssd_bn"))
# The settled study (docs/study.md, "The settled study"): four variants, four rates swept on seed 0
# and chosen on 200 held-out training images, seeds 1 and 2 at each variant's rate; 24 runs of 600
# steps, each evaluated on the validation and the test split every 100 steps.
SETTLED = Budget(steps=600, trained_trunk_steps=0, eval_every_steps=100, seeds=(0, 1, 2),
                 width_multiplier=1 / 8, num_train=4000, num_test=200, batch_size=8,
                 variants=("ssd_fine", "mdssd_bn", "mdssd_bn_shallow", "ssd"),
                 trained_trunk_variants=(), lrs=(2e-3, 4e-3, 6e-3, 1e-2), val_images=200)
SETTLED_OUT = os.path.join("benchmarks", "results", "study_settled.json")
SETTLED_PLOT = os.path.join("benchmarks", "study_settled.png")
# The context study (--context; docs/study.md, "The context study"): the settled study's method on
# the context data, where a tiny object's class is told by a scene marker beyond the shallow heads'
# view. Three rates per variant (2e-3 was never chosen in the settled study), chosen on seed 0.
CONTEXT = dataclasses.replace(SETTLED, variants=("ssd_fine", "mdssd_bn", "mdssd_bn_shallow"),
                              data=("context",), lrs=(4e-3, 6e-3, 1e-2))
CONTEXT_OUT = os.path.join("benchmarks", "results", "study_context.json")
CONTEXT_PLOT = os.path.join("benchmarks", "study_context.png")
# A detection counts for the confusion of a tiny object when it scores at least this (the
# pictures' threshold) and overlaps the object with IoU >= 0.5.
CONFUSION_SCORE = 0.3
# The whole machinery at toy size (tests/test_study.py): a narrow model, a handful of steps.
QUICK = Budget(steps=4, trained_trunk_steps=4, eval_every_steps=2, seeds=(0,), width_multiplier=1 / 32, num_train=16,
               num_test=4, batch_size=2)
QUICK_SETTLED = dataclasses.replace(QUICK, seeds=(0, 1), trained_trunk_steps=0, trained_trunk_variants=(),
                                    variants=("ssd_fine", "mdssd_bn_shallow"), lrs=(2e-3, 1e-2),
                                    val_images=4)


# ---------------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------------

def variant_config(variant, data, budget, seed, data_dir="", init="scratch", lr=None):
  """The demo config turned into `variant` on `data` ("shape" | "colour") at `budget`, seed `seed`,
  trained for the steps of regime `init` (data_dir: the generated data's TFDS folder, "" = default)
  at base learning rate `lr` (None: the recipe's). With budget.val_images, the runs train on the
  first num_train - val_images generated training images and are also evaluated on the rest
  (evaluator VAL_EVALUATOR)."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from configs import demo_synthetic  # pylint: disable=g-import-not-at-top
  if variant not in VARIANTS:
    raise ValueError(f"unknown study variant {variant!r}; known: {list(VARIANTS)}")
  if data not in ("shape", "colour", "context"):
    raise ValueError(f"unknown study data {data!r}; known: 'shape' (colour_by_class=False), "
                     "'colour', 'context' (synthetic.context=True)")
  c = demo_synthetic.get_config()
  c.seed = int(seed)
  c.data.data_dir = data_dir
  c.model.batch_norm = True            # every variant trains its trunk from scratch: batch norm
  c.model.width_multiplier = budget.width_multiplier
  c.data.synthetic.colour_by_class = data == "colour"
  if data == "context":
    c.data.synthetic.context = True
    c.model.num_classes = 9
  c.data.synthetic.num_train = budget.num_train
  c.data.synthetic.num_test = budget.num_test
  c.train.global_batch_size = budget.batch_size
  c.train.reference_batch_size = budget.batch_size
  steps = budget.trained_trunk_steps if init == "trained_trunk" else budget.steps
  # The demo's schedule (warm-up and decays) stretched to the run's steps.
  # The study's schedule (STUDY_SCHEDULE) stretched to the run's steps.
  scale = lambda step: max(1, round(step * steps / STUDY_SCHEDULE["num_steps"]))
  c.train.warmup_steps = scale(STUDY_SCHEDULE["warmup_steps"])
  c.train.lr_decay_steps = tuple(scale(step) for step in STUDY_SCHEDULE["lr_decay_steps"])
  c.train.num_steps = steps
  c.train.log_every_steps = min(50, budget.eval_every_steps)
  c.train.checkpoint_every_steps = budget.eval_every_steps
  c.train.keep_checkpoints = 2
  c.evals.voc = common.voc_eval(use_07_metric=False, every_steps=budget.eval_every_steps,
                                num_pictures=0)
  c.eval.batch_size = min(25, budget.num_test)
  c.data.num_workers = 0 if budget.num_train < 100 else 1
  if lr is not None:
    c.train.base_lr = float(lr)
  if budget.val_images:
    kept = budget.num_train - budget.val_images
    if kept < budget.batch_size:
      raise ValueError(f"val_images={budget.val_images} leaves {kept} of num_train={budget.num_train} "
                       "images to train on")
    c.data.train_split = f"train[:{kept}]"
    c.evals[VAL_EVALUATOR] = common.voc_eval(use_07_metric=False, split=f"train[{kept}:]",
                                             every_steps=budget.eval_every_steps, num_pictures=0)

  family, overrides = VARIANTS[variant]
  for key, value in overrides.items():
    c.model[key] = value
  if family == "mdssd":
    return c
  # SSD: conv4_3 and conv7 take the places of Fusion Modules 2 and 3 with the same default boxes;
  # the finest rung (Fusion Module 1's) goes, unless ssd_fine puts it on the raw conv3_3.
  num_fusions = len(c.model.fusions)
  heads = ("conv4_3", "conv7") + tuple(c.model.head_sources[num_fusions:])
  first = 0 if family == "ssd_fine" else 1
  c.model.architecture = "ssd"
  c.model.head_sources = (("conv3_3",) if family == "ssd_fine" else ()) + heads
  c.model.fusions = ()
  for key in ("feature_sizes", "steps", "min_sizes", "max_sizes", "aspect_ratios"):
    c.anchors[key] = tuple(c.anchors[key])[first:]
  return c


def recipe(config):
  """The training recipe the study ran on (crop sampler, matching, hue, optimiser, the scratch
  schedule: `config` is a scratch run's), recorded in the results file."""
  return {"loss.matching": config.loss.matching, "augment.crop_sampler": config.augment.crop_sampler,
          "augment.hue_delta_deg": float(config.augment.hue_delta_deg),
          "augment.hue_overflow": config.augment.hue_overflow,
          "augment.expand_prob": float(config.augment.expand_prob),
          "train.optimizer": config.train.optimizer, "train.base_lr": float(config.train.base_lr),
          "train.warmup_steps": int(config.train.warmup_steps),
          "train.lr_decay_steps": [int(s) for s in config.train.lr_decay_steps],
          "data.synthetic.max_objects": int(config.data.synthetic.max_objects),
          "model.input_size_px": int(config.model.input_size_px),
          "model.batch_norm (trunk)": bool(config.model.batch_norm)}


def model_cost(config):
  """(parameters, forward GFLOPs per image from XLA's cost analysis) of a config's detector."""
  from benchmarks import model_table  # pylint: disable=g-import-not-at-top
  from mdssd_jax import models  # pylint: disable=g-import-not-at-top
  model, _ = models.build_detector(config)
  size = int(config.model.input_size_px)
  variables, _, _ = models.abstract_forward(model, size, 1)
  flops = model_table.forward_flops(model, variables, size, 1)
  return models.count_params(variables["params"]), flops / 1e9


# ---------------------------------------------------------------------------------------------------
# One run.
# ---------------------------------------------------------------------------------------------------

def run_name(variant, data, init, seed, lr=None):
  return f"{data}_{init}_{variant}" + (f"_lr{lr:g}" if lr is not None else "") + f"_seed{seed}"


def latest_step(workdir):
  from mdssd_jax.state import checkpointing  # pylint: disable=g-import-not-at-top
  steps = checkpointing.available_steps(os.path.join(workdir, "checkpoints"))
  return steps[-1] if steps else None


def seed_trained_trunk(config, workdir, source_config, source_workdir):
  """Writes a step-0 checkpoint in `workdir`: a fresh state of `config` whose VGG16 trunk (params
  and batch-norm statistics) is the latest checkpoint of the `source_workdir` run."""
  import jax  # pylint: disable=g-import-not-at-top
  from mdssd_jax.state import checkpointing  # pylint: disable=g-import-not-at-top
  from mdssd_jax.state import experiment  # pylint: disable=g-import-not-at-top
  from mdssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  _, source, _ = experiment.load_checkpoint(source_config, source_workdir)
  setup = experiment.Setup(config)
  state = setup.initial_state()
  for collection in ("params", "batch_stats"):
    tree = dict(state[collection])
    if jax.tree_util.tree_structure(tree[TRUNK_PARAMS]) != jax.tree_util.tree_structure(
        source[collection][TRUNK_PARAMS]):
      raise ValueError(f"the trunk of {source_workdir} does not fit {workdir}'s model")
    tree[TRUNK_PARAMS] = jax.device_put(source[collection][TRUNK_PARAMS], setup.replicated)
    state[collection] = tree
  train_iter = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), config.train,
                                       best_metric=config.eval.best_metric)
  try:
    checkpointing.save(manager, 0, state, train_iter, setup.meta(state))
    manager.wait_until_finished()
  finally:
    manager.close()


def read_curve(workdir, evaluator=EVALUATOR):
  """[{"step", "all", "tiny", "small", "medium"}] of the run's evaluations during training."""
  from mdssd_jax.report import history  # pylint: disable=g-import-not-at-top
  by_step = {}
  path = os.path.join(workdir, history.EVAL_RESULTS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if r.get("evaluator") == evaluator and r.get("mode") == "train":
          by_step[int(r["step"])] = r     # the last line of a step wins
  return [dict(step=s, all=_ap(r["mAP"]),
               **{b: _ap(r.get(f"AP_size/{b}", float("nan"))) for b in BUCKETS})
          for s, r in sorted(by_step.items())]


# Fusion Block branches switched off at test time (`branch_ablation`): the L2Norm of each is the
# last layer before the sum, so a zero scale removes that branch from the sum.
BRANCHES = ("deep", "shallow")
ABLATION_FILE = "branch_ablation.json"


def fusion_blocks(params):
  """Names of the Fusion Blocks in a detector's params (the subtrees with both branch norms)."""
  return [name for name, sub in params.items()
          if hasattr(sub, "keys") and {f"{b}_norm" for b in BRANCHES} <= set(sub.keys())]


def branch_off(params, branch):
  """A copy of `params` whose Fusion Blocks' `branch` ("deep" | "shallow") L2Norm scales are zero:
  every block's output then depends on its other branch alone. `params` is not changed."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if branch not in BRANCHES:
    raise ValueError(f"unknown Fusion Block branch {branch!r}; known: {BRANCHES}")
  out = dict(params)
  for name in fusion_blocks(params):
    block = dict(params[name])
    block[f"{branch}_norm"] = dict(block[f"{branch}_norm"],
                                   scale=jnp.zeros_like(block[f"{branch}_norm"]["scale"]))
    out[name] = block
  return out


def branch_ablation(config, run_dir):
  """AP of a finished MDSSD run's last checkpoint, intact and with each Fusion Block branch off.

  The same checkpoint and test images, evaluated three times: as trained ("intact"), with the
  deep branch's L2Norm scale set to zero in every Fusion Block ("deep_off": the heads see the
  shallow map alone), and with the shallow branch's ("shallow_off"). Batch-norm statistics stay
  the trained ones, so a branch's loss also shifts what the layers after the sum see: the figures
  say how much the trained block leans on each branch, not what a block without it would learn.
  Returns {"intact" | "deep_off" | "shallow_off": {"all", "tiny", "small", "medium"}}, cached in
  the run's folder (a rerun reads it back).
  """
  cache = os.path.join(run_dir, ABLATION_FILE)
  if os.path.exists(cache):
    with open(cache) as f:
      return json.load(f)
  from mdssd_jax import evaluation  # pylint: disable=g-import-not-at-top
  from mdssd_jax.core import multihost  # pylint: disable=g-import-not-at-top
  from mdssd_jax.run import evaluate  # pylint: disable=g-import-not-at-top
  from mdssd_jax.state import weights  # pylint: disable=g-import-not-at-top
  detector = weights.load_detector(config, run_dir)
  evaluator = evaluation.make_evaluators(config, detector.class_names)[EVALUATOR]
  predictor = evaluate.make_batch_predictor(config, detector.model, detector.anchors_cxcywh,
                                            detector.convention, multihost.data_mesh())
  params = detector.variables["params"]
  blocks = fusion_blocks(params)
  if len(blocks) != len(config.model.fusions):
    raise ValueError(f"{run_dir}: expected {len(config.model.fusions)} Fusion Blocks in the "
                     f"checkpoint, found {blocks}")
  out = {}
  for branch in (None,) + BRANCHES:
    variables = dict(detector.variables, params=branch_off(params, branch) if branch else params)
    metrics = evaluator.run(predictor(variables), detector.step).metrics
    out[f"{branch}_off" if branch else "intact"] = dict(
        all=_ap(metrics["mAP"]), **{b: _ap(metrics.get(f"AP_size/{b}", float("nan"))) for b in BUCKETS})
    if config.data.synthetic.get("context", False):
      out[f"{branch}_off" if branch else "intact"]["confusion"] = tiny_confusion(
          *evaluator.metric.images(), detector.class_names)
  with open(cache + ".tmp", "w") as f:
    json.dump(out, f)
  os.replace(cache + ".tmp", cache)
  return out


def tiny_confusion(predictions, ground_truths, class_names, score_threshold=CONFUSION_SCORE):
  """The share of a context run's detections of tiny objects that name the right shape in the
  wrong scene: the confusion a model that does not see the scene marker cannot avoid.

  predictions / ground_truths: the metric's per-image dicts (pixels, labels 1..C); class_names:
  "shape@scene" for the context classes. Every tiny ground truth (longer side < 16 px) of a context
  class takes the detections scoring >= score_threshold with IoU >= 0.5 and a context class of the
  same shape; returns wrong-scene ones / all such ones (None when there are none). A model that
  guesses the scene is near 0.5; one that sees it near 0.
  """
  from mdssd_jax.core import boxes as boxes_lib  # pylint: disable=g-import-not-at-top
  split = [name.split("@") if "@" in name else (name, None) for name in class_names]
  right = wrong = 0
  for pred, gt in zip(predictions, ground_truths):
    gt_boxes = np.asarray(gt["boxes"], np.float64).reshape(-1, 4)
    keep = np.asarray(pred["scores"]) >= score_threshold
    p_boxes = np.asarray(pred["boxes"], np.float64).reshape(-1, 4)[keep]
    p_labels = np.asarray(pred["labels"]).reshape(-1)[keep]
    if not len(gt_boxes) or not len(p_boxes):
      continue
    iou = boxes_lib.iou(gt_boxes, p_boxes)
    for g, label in enumerate(np.asarray(gt["labels"]).reshape(-1)):
      shape, scene = split[int(label) - 1]
      size = np.max(gt_boxes[g, 2:] - gt_boxes[g, :2])
      if scene is None or size >= 16:
        continue
      for d in np.nonzero(iou[g] >= 0.5)[0]:
        d_shape, d_scene = split[int(p_labels[d]) - 1]
        if d_scene is not None and d_shape == shape:
          right += d_scene == scene
          wrong += d_scene != scene
  return None if right + wrong == 0 else wrong / (right + wrong)


CONFUSION_FILE = "context_confusion.json"


def run_confusion(config, run_dir):
  """`tiny_confusion` of a finished context run's last checkpoint on the test images (cached)."""
  cache = os.path.join(run_dir, CONFUSION_FILE)
  if os.path.exists(cache):
    with open(cache) as f:
      return json.load(f)["confusion"]
  from mdssd_jax import evaluation  # pylint: disable=g-import-not-at-top
  from mdssd_jax.core import multihost  # pylint: disable=g-import-not-at-top
  from mdssd_jax.run import evaluate  # pylint: disable=g-import-not-at-top
  from mdssd_jax.state import weights  # pylint: disable=g-import-not-at-top
  detector = weights.load_detector(config, run_dir)
  evaluator = evaluation.make_evaluators(config, detector.class_names)[EVALUATOR]
  predictor = evaluate.make_batch_predictor(config, detector.model, detector.anchors_cxcywh,
                                            detector.convention, multihost.data_mesh())
  evaluator.run(predictor(detector.variables), detector.step)
  confusion = tiny_confusion(*evaluator.metric.images(), detector.class_names)
  with open(cache + ".tmp", "w") as f:
    json.dump({"confusion": confusion, "step": detector.step}, f)
  os.replace(cache + ".tmp", cache)
  return confusion


def run_ablations(out, workdir, data_dir=""):
  """`branch_ablation` of every finished MDSSD run in `out` that still lacks one; saved into `out`
  under "ablation": [{"variant", "seed", "data", "init", "intact", "deep_off", "shallow_off"}]."""
  results = load_results(out)
  if not results["runs"]:
    return results
  _use_compile_cache(workdir)
  budget = budget_from_json(results["budget"], seeds=())
  rates = chosen_rates(results)
  have = {(a["variant"], a["data"], a["init"], a["seed"]) for a in results.get("ablation", [])}
  new = []
  for r in results["runs"]:
    key = (r["variant"], r["data"], r["init"], r["seed"])
    if (r["family"] != "mdssd" or key in have
        or VARIANTS[r["variant"]][1].get("fusion_deep_branch", True) is False):
      continue     # (a block without its deep branch has no branch to switch off)
    if budget.lrs and r["lr"] != rates[(r["variant"], r["data"])]:
      continue     # a swept rate that was not chosen
    name = run_name(*run_key(r))
    run_dir = os.path.join(workdir, name)
    if latest_step(run_dir) != r["steps"]:
      print(f"== no branch ablation of {name}: its final checkpoint is not in {run_dir}", flush=True)
      continue
    print(f"== branch ablation of {name}", flush=True)
    config = variant_config(r["variant"], r["data"], budget, r["seed"], data_dir, r["init"],
                            r.get("lr"))
    new.append(dict(variant=r["variant"], seed=r["seed"], data=r["data"], init=r["init"],
                    **branch_ablation(config, run_dir)))
  if new:
    results = load_results(out)   # read again: only the "ablation" list is this function's
    results["ablation"] = results.get("ablation", []) + new
    save_results(out, results)
  return results


def _ap(value):
  """An AP as a JSON number; NaN (a bucket with no ground truth) as None."""
  value = float(value)
  return None if math.isnan(value) else value


class _Stop:
  """Set by SIGTERM: checkpoint the running run, then stop the study."""
  requested = False


def train_run(config, workdir):
  """Trains (or resumes) one run; returns the wall seconds of all its sittings, or None if stopped."""
  from mdssd_jax.run import train  # pylint: disable=g-import-not-at-top
  wall_path = os.path.join(workdir, "study_wall_s.json")
  os.makedirs(workdir, exist_ok=True)
  previous = json.load(open(wall_path))["wall_s"] if os.path.exists(wall_path) else 0.0
  start = time.time()
  try:
    train.train_and_evaluate(config, workdir)
  finally:
    # Every sitting's time counts, a stopped one too (compiles included: what a user waits).
    with open(wall_path, "w") as f:
      json.dump({"wall_s": previous + time.time() - start}, f)
  done = latest_step(workdir) == config.train.num_steps
  return previous + time.time() - start if done else None


# ---------------------------------------------------------------------------------------------------
# The study.
# ---------------------------------------------------------------------------------------------------

def load_results(path):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {"recipe": None, "budget": None, "runs": []}


def save_results(path, results):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=1)
  os.replace(tmp, path)   # atomic: a kill never leaves half a file


def steps_out(steps, study="settled"):
  """The results file of the settled (or the context) study's chosen rates at `steps` steps."""
  return os.path.join("benchmarks", "results", f"study_{study}_{steps}steps.json")


def at_steps(budget, steps, sweep_results):
  """`budget` (a sweep) turned into every variant at its chosen rate for `steps` steps, the rates
  read from `sweep_results`; eight evaluations per run. Raises ValueError naming the variants whose
  sweep is not finished."""
  chosen = chosen_rates(dict(sweep_results, budget={"lrs": list(budget.lrs)}))
  # One rate per variant: the first data set's (the settled study runs one).
  rates = {v: chosen.get((v, budget.data[0])) for v in budget.variants}
  missing = [v for v, lr in rates.items() if lr is None]
  if missing:
    raise ValueError(f"--steps needs the chosen rates of {missing}: their sweep is not finished in "
                     "the --rates_from results (run --settled first)")
  return dataclasses.replace(budget, steps=int(steps), eval_every_steps=max(1, int(steps) // 8),
                             lrs=(), variant_lrs=tuple(sorted(rates.items())))


def budget_from_json(fields, **overrides):
  """A Budget from its JSON form (a results file's "budget", a child's spec): lists back to tuples."""
  return Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}, **overrides)


def sweep_seed(runs):
  """The seed a learning-rate sweep ran every rate on: the first seed, the smallest in the results."""
  return min(r["seed"] for r in runs)


def chosen_rates(results):
  """{(variant, data): the rate `chosen_lr` picks from the results' sweep, None while unfinished}
  for every variant and data set with runs in `results` (its budget's "lrs" are the rates swept)."""
  runs = results["runs"]
  lrs = tuple(float(x) for x in (results.get("budget") or {}).get("lrs", ()))
  if not runs or not lrs:
    return {}
  first = sweep_seed(runs)
  return {(r["variant"], r["data"]): chosen_lr(runs, r["variant"], r["data"], lrs, first) for r in runs}


def run_key(run):
  """(variant, data, init, seed, lr) of a results entry; lr None for a run at the recipe's rate."""
  return (run["variant"], run["data"], run["init"], run["seed"], run.get("lr"))


def chosen_lr(runs, variant, data, lrs, seed):
  """The learning rate of `lrs` whose `seed` run of `variant` on `data` (from scratch) has the best
  validation mAP@0.5 (SELECT_ON; a tie goes to the smaller rate); None until all of them finished."""
  val = {r["lr"]: r["val"][SELECT_ON] for r in runs
         if (r["variant"], r["data"], r["init"], r["seed"]) == (variant, data, "scratch", seed)
         and r.get("lr") in lrs}
  if set(val) != set(lrs):
    return None
  return max(sorted(lrs), key=lambda lr: -math.inf if val[lr] is None else val[lr])


def planned_runs(budget, runs=()):
  """(variant, data, init, seed, lr) in the order they run, as far as `runs` (the finished ones)
  tell it.

  At the recipe's rate (no budget.lrs): seed by seed, so that a partial study already compares every
  variant; a trained-trunk run after its seed's `ssd` run. With budget.lrs: variant by variant, the
  first seed at every rate, then the other seeds at the rate `chosen_lr` picks, which is known once
  the variant's sweep has finished (a partial study then holds whole variants).
  """
  plan = []
  for data in budget.data:
    if budget.variant_lrs:
      rates = dict(budget.variant_lrs)
      for seed in budget.seeds:
        plan += [(v, data, "scratch", seed, float(rates[v])) for v in budget.variants]
      continue
    if budget.lrs:
      first, others = budget.seeds[0], budget.seeds[1:]
      for v in budget.variants:
        plan += [(v, data, "scratch", first, float(lr)) for lr in budget.lrs]
        lr = chosen_lr(runs, v, data, tuple(float(x) for x in budget.lrs), first)
        if lr is not None:
          plan += [(v, data, "scratch", seed, lr) for seed in others]
      continue
    for seed in budget.seeds:
      plan += [(v, data, "scratch", seed, None) for v in budget.variants]
      if TRUNK_SOURCE in budget.variants:
        plan += [(v, data, "trained_trunk", seed, None) for v in budget.trained_trunk_variants]
  return plan


# A run's child process exits with this code when SIGTERM stopped it after a checkpoint.
_EXIT_STOPPED = 3


def run_study(budget, out, workdir, data_dir="", workers=1):
  """Runs every planned run not yet in `out`, `workers` at a time; returns the results dict.

  Each run trains in a child process (`--one_run`), so that runs can train side by side (one per
  core). This process alone writes `out`, in the order the runs finish; a trained-trunk run starts
  once its trunk's source run has finished.
  """
  results = load_results(out)
  if (budget.lrs or budget.variant_lrs) and budget.trained_trunk_variants:
    raise ValueError("a study with its own learning rates (budget.lrs, budget.variant_lrs) trains "
                     "from scratch only: set trained_trunk_variants=()")
  missing = [v for v in budget.variants if budget.variant_lrs and v not in dict(budget.variant_lrs)]
  if missing:
    raise ValueError(f"no learning rate for {missing} in budget.variant_lrs {budget.variant_lrs}")
  this_recipe = recipe(variant_config("ssd", budget.data[0], budget, 0))
  # What makes runs comparable; which variants, seeds and data a sitting runs may grow.
  this_budget = {k: getattr(budget, k) for k in SIZE_KEYS}
  this_budget.update({k: json.loads(json.dumps(getattr(budget, k))) for k in SETTLED_KEYS
                      if getattr(budget, k)})
  for key, value in (("recipe", this_recipe), ("budget", this_budget)):
    if results[key] not in (None, value):
      raise ValueError(f"{out} holds runs of another {key} ({results[key]}) than this study's "
                       f"({value}): pass another --out, or move the file away to start afresh")
    results[key] = value
  save_results(out, results)
  done = {run_key(r) for r in results["runs"]}
  pending = [key for key in planned_runs(budget, results["runs"]) if key not in done]
  running = {}     # run key -> (child process, its output file or None, its core or None)
  costs = {}
  failed = []
  cpus = sorted(os.sched_getaffinity(0))

  def stop(signum, frame):
    del frame
    print(f"signal {signum}: stopping the study after the running runs checkpoint", flush=True)
    _Stop.requested = True
    for proc, _, _ in running.values():
      proc.send_signal(signal.SIGTERM)   # each child's trainer checkpoints, then exits

  previous = signal.signal(signal.SIGTERM, stop)
  try:
    while running or (pending and not _Stop.requested and not failed):
      for key in list(pending):
        if len(running) >= workers or _Stop.requested or failed:
          break
        variant, data, init, seed, _ = key
        source = (TRUNK_SOURCE, data, "scratch", seed, None)
        if init == "trained_trunk" and source not in done:
          if source not in pending and source not in running:
            raise RuntimeError(f"{run_name(*key)} needs the finished {run_name(*source)} run")
          continue   # its trunk is still training
        pending.remove(key)
        cpu = None
        if 1 < workers <= len(cpus):   # a core no running child holds
          cpu = next(c for c in cpus if c not in {held for _, _, held in running.values()})
        running[key] = _start_run(key, budget, workdir, data_dir, cpu, log=workers > 1) + (cpu,)
      time.sleep(0.5)
      for key, (proc, log, _) in list(running.items()):
        code = proc.poll()
        if code is None:
          continue
        del running[key]
        if log is not None:
          log.close()
        run_dir = os.path.join(workdir, run_name(*key))
        if code == 0:
          _record(results, key, budget, run_dir, data_dir, costs)
          save_results(out, results)
          done.add(key)
          # A finished sweep tells the rate of its variant's other seeds.
          pending += [k for k in planned_runs(budget, results["runs"])
                      if k not in done and k not in running and k not in pending]
        elif code == _EXIT_STOPPED or (_Stop.requested and code == -signal.SIGTERM):
          _Stop.requested = True   # (a child still starting up dies of the SIGTERM itself)
          print(f"stopped in {run_name(*key)} at step {latest_step(run_dir)}; rerun the same command "
                "to resume", flush=True)
        else:
          failed.append(f"{run_name(*key)} (exit code {code}"
                        + (f"; its output: {log.name})" if log is not None else ")"))
  finally:
    signal.signal(signal.SIGTERM, previous)
  if failed:
    raise RuntimeError(f"study runs failed: {'; '.join(failed)}. Finished runs are kept in {out}; "
                       "rerun the same command to resume")
  return results


def _start_run(key, budget, workdir, data_dir, cpu, log):
  """Starts one run's child process (pinned to `cpu` unless None); its output goes to a file in the
  run's folder when `log`, else to this process's console."""
  name = run_name(*key)
  run_dir = os.path.join(workdir, name)
  os.makedirs(run_dir, exist_ok=True)
  spec = dict(key=list(key), budget=dataclasses.asdict(budget), workdir=workdir, data_dir=data_dir,
              cpu=cpu)
  cmd = [sys.executable, "-m", "benchmarks.study_small_objects", f"--one_run={json.dumps(spec)}"]
  output = open(os.path.join(run_dir, "study_output.txt"), "a") if log else None
  steps = budget.trained_trunk_steps if key[2] == "trained_trunk" else budget.steps
  print(f"== {name} ({steps} steps" + (f", lr {key[4]:g}" if key[4] is not None else "")
        + f") in {run_dir}" + (f", output in {output.name}" if log else ""),
        flush=True)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen(cmd, cwd=root, stdout=output, stderr=subprocess.STDOUT if log else None)
  return proc, output


def _use_compile_cache(workdir):
  """Runs of one variant (every seed, both regimes, every sitting) compile the same programs: keep
  them on disk under `workdir`, since a compile costs minutes on a loaded 2-core CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def one_run(spec):
  """A child process's work: prepares (trained trunk) and trains one run; returns its exit code."""
  if spec["cpu"] is not None:
    os.sched_setaffinity(0, {spec["cpu"]})   # before JAX starts its threads
  from mdssd_jax.data import orphan_guard  # pylint: disable=g-import-not-at-top
  orphan_guard.watch_parent(os.getppid())    # the study was killed: stop too
  workdir, data_dir = spec["workdir"], spec["data_dir"]
  _use_compile_cache(workdir)
  budget = budget_from_json(spec["budget"])
  variant, data, init, seed, lr = spec["key"]
  config = variant_config(variant, data, budget, seed, data_dir, init, lr)
  run_dir = os.path.join(workdir, run_name(variant, data, init, seed, lr))
  if init == "trained_trunk" and latest_step(run_dir) is None:
    seed_trained_trunk(config, run_dir, variant_config(TRUNK_SOURCE, data, budget, seed, data_dir),
                       os.path.join(workdir, run_name(TRUNK_SOURCE, data, "scratch", seed)))
  return 0 if train_run(config, run_dir) is not None else _EXIT_STOPPED


def _record(results, key, budget, run_dir, data_dir, costs):
  """Appends the finished run `key` (its curve, wall time and the variant's cost; with a validation
  split its validation AP and curve too) to `results`."""
  variant, data, init, seed, lr = key
  config = variant_config(variant, data, budget, seed, data_dir, init, lr)
  steps = config.train.num_steps
  if variant not in costs:
    costs[variant] = model_cost(config)
  curve = read_curve(run_dir)
  last = curve[-1] if curve else {"step": None}
  if last["step"] != steps:
    raise RuntimeError(f"{run_dir} has no evaluation at step {steps}")
  with open(os.path.join(run_dir, "study_wall_s.json")) as f:
    wall_s = json.load(f)["wall_s"]
  run = dict(
      variant=variant, family=VARIANTS[variant][0], seed=seed, data=data, init=init,
      steps=steps, wall_s=round(wall_s, 1), params=costs[variant][0],
      gflops=round(costs[variant][1], 4), ap={k: last[k] for k in ("all",) + BUCKETS},
      curve=[{"step": p["step"], "all": p["all"], "tiny": p["tiny"]} for p in curve])
  if lr is not None:
    run["lr"] = lr
  val_text = ""
  if budget.val_images:
    val_curve = read_curve(run_dir, VAL_EVALUATOR)
    if not val_curve or val_curve[-1]["step"] != steps:
      raise RuntimeError(f"{run_dir} has no validation evaluation at step {steps}")
    run["val"] = {k: val_curve[-1][k] for k in ("all",) + BUCKETS}
    run["val_curve"] = [{"step": p["step"], "all": p["all"], "tiny": p["tiny"]} for p in val_curve]
    val_text = f", validation mAP {run['val']['all']:.3f}"
  if data == "context":   # how often a tiny object's detection names the wrong scene
    run["confusion"] = run_confusion(config, run_dir)
  results["runs"].append(run)
  print(f"== {run_name(*key)}: mAP {last['all']:.3f}, tiny AP {last['tiny']:.3f}{val_text}, "
        f"{wall_s / 60:.1f} min", flush=True)


# ---------------------------------------------------------------------------------------------------
# Tables and the plot, from the JSON alone.
# ---------------------------------------------------------------------------------------------------

def _mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return float("nan"), float("nan")
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def _fmt(mean, std):
  if math.isnan(mean):
    return "n/a"
  return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def selected_runs(results):
  """The runs the tables compare: all of them, or in a learning-rate sweep those at the rate chosen
  for their variant (`chosen_lr`) only."""
  if not (results.get("budget") or {}).get("lrs"):
    return list(results["runs"])
  rates = chosen_rates(results)
  return [r for r in results["runs"] if r.get("lr") == rates[(r["variant"], r["data"])]]


def groups(results):
  """{(data, init): {variant: [runs]}} in plan order (the runs of `selected_runs`)."""
  out = {}
  for r in selected_runs(results):
    out.setdefault((r["data"], r["init"]), {}).setdefault(r["variant"], []).append(r)
  order = list(VARIANTS)
  return {k: dict(sorted(v.items(), key=lambda kv: order.index(kv[0]))) for k, v in out.items()}


def tables(results):
  """The markdown of docs/study.md: recipe, one table per (data, regime), and the fusion's measured gain."""
  lines = []
  rec = results.get("recipe") or {}
  lines.append("Recipe: " + ", ".join(f"`{k}={v}`" for k, v in rec.items()) + ".")
  budget = results.get("budget") or {}
  if budget:
    lines.append(f"Budget: {budget['steps']} steps from scratch, {budget['trained_trunk_steps']} "
                 f"with a trained trunk, batch {budget['batch_size']}, width "
                 f"{budget['width_multiplier']:g}, {budget['num_train']} training / "
                 f"{budget['num_test']} test images, evaluated every {budget['eval_every_steps']} "
                 f"steps.")
  settled = bool(budget.get("lrs") or budget.get("variant_lrs"))
  if budget.get("variant_lrs"):
    lines.append("Each variant at its rate chosen by the settled study's sweep: "
                 + ", ".join(f"`{v}` {lr:g}" for v, lr in budget["variant_lrs"])
                 + (f"; validation on {budget['val_images']} held-out training images"
                    if budget.get("val_images") else "") + ".")
  if budget.get("lrs"):
    lines.append(f"Learning rates swept on seed {sweep_seed(results['runs'])} of every "
                 f"variant: {', '.join(f'{x:g}' for x in budget['lrs'])}; chosen on validation "
                 f"mAP@0.5 over {budget['val_images']} generated training images held out of "
                 f"training (the runs train on the other {budget['num_train'] - budget['val_images']}); "
                 "the recipe's `train.base_lr` above is replaced by each variant's chosen rate.")
  for (data, init), by_variant in groups(results).items():
    lines.append("")
    if budget.get("lrs"):
      lines.extend(sweep_table(results, data))
      lines.append("")
    lines.append(f"**{data} data, {init.replace('_', ' ')}** (AP@0.5, VOC area rule, mean ± std over "
                 "seeds; buckets by the object's longer side: tiny < 16 px, small 16-32, medium > 32)")
    lines.append("")
    context = data == "context"
    extra = (" lr | Δ mAP, last 25% of steps |" if settled else "") + (
        " tiny: wrong scene |" if context else "")
    lines.append("| variant | family | params | GFLOPs / image | seeds | steps | mAP | AP tiny | AP small | "
                 "AP medium | min / run |" + extra)
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if settled else "")
                 + ("---|" if context else ""))
    for variant, runs in by_variant.items():
      r0 = runs[0]
      cells = [_fmt(*_mean_std([r["ap"][k] for r in runs])) for k in ("all",) + BUCKETS]
      minutes = np.mean([r["wall_s"] for r in runs]) / 60
      row = (f"| {variant} | {r0['family']} | {r0['params'] / 1e6:.3f} M | {r0['gflops']:.3f} | "
             f"{len(runs)} | {r0['steps']} | " + " | ".join(cells) + f" | {minutes:.1f} |")
      if settled:
        row += f" {r0['lr']:g} | {_fmt(*_mean_std([late_change(r['curve']) for r in runs]))} |"
      if context:
        row += f" {_fmt(*_mean_std([r.get('confusion') for r in runs]))} |"
      lines.append(row)
    lines.append("")
    if context:
      lines.append("Wrong scene: the share of the detections (score >= "
                   f"{CONFUSION_SCORE:g}, IoU >= 0.5) of tiny context-class objects that name the "
                   "right shape in the wrong scene; a model blind to the scene marker sits near 0.5, "
                   "the ambiguity limit, and its tiny-object AP near half its AP for local classes.")
      lines.append("")
    if settled:
      lines.extend(settled_verdicts(by_variant))
    else:
      lines.append(verdict(by_variant, init))
    ablation = [a for a in results.get("ablation", []) if (a["data"], a["init"]) == (data, init)]
    if ablation:
      lines.append("")
      lines.extend(ablation_table(ablation))
  return "\n".join(lines)


def ablation_table(ablation):
  """Markdown lines: AP with every Fusion Block intact, with its deep branch off and with its
  shallow branch off (mean ± std over seeds), per MDSSD variant."""
  states = ("intact",) + tuple(f"{b}_off" for b in BRANCHES)
  lines = ["Fusion Block branches switched off at test time (the same checkpoints and test images; "
           "`branch_ablation` in the script):", "",
           "| variant | seeds | " + " | ".join(f"mAP {s.replace('_', ' ')}" for s in states) + " | "
           + " | ".join(f"AP tiny {s.replace('_', ' ')}" for s in states) + " |",
           "|---|---|" + "---|" * (2 * len(states))]
  context = all("confusion" in a["intact"] for a in ablation)
  if context:
    lines[2] += " " + " | ".join(f"wrong scene {s.replace('_', ' ')}" for s in states) + " |"
    lines[3] += "---|" * len(states)
  order = list(VARIANTS)
  for variant in sorted({a["variant"] for a in ablation}, key=order.index):
    rows = [a for a in ablation if a["variant"] == variant]
    keys = ("all", "tiny") + (("confusion",) if context else ())
    cells = [_fmt(*_mean_std([a[s][k] for a in rows])) for k in keys for s in states]
    lines.append(f"| {variant} | {len(rows)} | " + " | ".join(cells) + " |")
  return lines


def sweep_table(results, data):
  """Markdown lines: validation mAP@0.5 (and tiny AP) of every swept rate, per variant, the chosen
  rate in bold."""
  lrs = tuple(float(x) for x in results["budget"]["lrs"])
  first = sweep_seed(results["runs"])
  rates = chosen_rates(results)
  lines = [f"Learning-rate sweep, {data} data, seed {first}: validation mAP@0.5 (validation tiny AP)",
           "", "| variant | " + " | ".join(f"lr {x:g}" for x in lrs) + " | chosen |",
           "|---|" + "---|" * (len(lrs) + 1)]
  order = list(VARIANTS)
  variants = sorted({r["variant"] for r in results["runs"] if r["data"] == data}, key=order.index)
  for variant in variants:
    by_lr = {r["lr"]: r for r in results["runs"]
             if (r["variant"], r["data"], r["seed"]) == (variant, data, first) and "val" in r}
    best = rates[(variant, data)]
    cells = []
    for lr in lrs:
      if lr not in by_lr:
        cells.append("(to run)")
        continue
      val = by_lr[lr]["val"]
      cell = f"{val['all']:.3f} ({_fmt(*_mean_std([val['tiny']]))})"
      cells.append(f"**{cell}**" if lr == best else cell)
    lines.append(f"| {variant} | " + " | ".join(cells) + f" | {'-' if best is None else f'{best:g}'} |")
  return lines


def late_change(curve, fraction=0.25):
  """How much test mAP@0.5 changed over the last `fraction` of a run's steps: the final evaluation
  minus the one at (1 - fraction) of the steps (the latest at or before it). The curve is flat
  where this is below 0.01."""
  last = curve[-1]
  start = (1 - fraction) * last["step"]
  before = [p for p in curve if p["step"] <= start]
  if not before:
    return None
  return last["all"] - before[-1]["all"]


# The settled study's three questions: (a, b, what a - b on tiny-object AP answers).
COMPARISONS = (
    ("mdssd_bn", "ssd_fine", "Does the Fusion Block help tiny objects?"),
    ("mdssd_bn", "mdssd_bn_shallow", "Is it the deep map's semantics?"),
    ("mdssd_bn_shallow", "ssd_fine", "Is it only a deeper fine head?"),
)


def compare(by_variant, a, b, metric="tiny"):
  """(mean of a - mean of b, the larger of the two seeds' std, the standard error of the
  difference, seeds of a, seeds of b) for AP `metric` of the final evaluations."""
  va = [r["ap"][metric] for r in by_variant[a] if r["ap"][metric] is not None]
  vb = [r["ap"][metric] for r in by_variant[b] if r["ap"][metric] is not None]
  (ma, sa), (mb, sb) = _mean_std(va), _mean_std(vb)
  noise = max((x for x in (sa, sb) if not math.isnan(x)), default=float("nan"))
  se = (math.sqrt(sa ** 2 / len(va) + sb ** 2 / len(vb)) if len(va) > 1 and len(vb) > 1
        else float("nan"))
  return ma - mb, noise, se, len(va), len(vb)


def settled_verdicts(by_variant):
  """Markdown lines: each of COMPARISONS answered with its size against the seeds' spread."""
  lines = []
  for a, b, question in COMPARISONS:
    if a not in by_variant or b not in by_variant:
      lines.append(f"- {question} (`{a}` vs `{b}`): not both run yet.")
      continue
    diff, noise, se, na, nb = compare(by_variant, a, b)
    all_diff = compare(by_variant, a, b, "all")[0]
    if math.isnan(se):
      judged = "too few seeds to judge"
    elif abs(diff) > 2 * se:
      judged = (f"more than twice its standard error ({se:.3f}): "
                + ("yes" if diff > 0 else "no, the opposite"))
    elif abs(diff) > noise:
      judged = (f"larger than the seeds' standard deviation ({noise:.3f}) but within twice its "
                f"standard error ({se:.3f}): suggestive, not shown")
    else:
      judged = f"within the seeds' standard deviation ({noise:.3f}): no measurable difference"
    lines.append(f"- {question} Tiny-object AP `{a}` − `{b}` = {diff:+.3f} ({na} and {nb} seeds; "
                 f"mAP {all_diff:+.3f}): {judged}.")
  return lines


def verdict(by_variant, init):
  """The issue's test in words: best MDSSD variant's tiny AP against ssd_fine's, with the seeds' std."""
  if "ssd_fine" not in by_variant:
    return "(no ssd_fine runs to compare with)"
  fine_mean, fine_std = _mean_std([r["ap"]["tiny"] for r in by_variant["ssd_fine"]])
  mdssd = {v: _mean_std([r["ap"]["tiny"] for r in runs]) for v, runs in by_variant.items()
           if runs[0]["family"] == "mdssd"}
  if not mdssd:
    return "(no MDSSD runs to compare with)"
  best = max(mdssd, key=lambda v: mdssd[v][0])
  mean, std = mdssd[best]
  diff = mean - fine_mean
  noise = max(s for s in (std, fine_std) if not math.isnan(s)) if not (
      math.isnan(std) and math.isnan(fine_std)) else float("nan")
  if math.isnan(noise):
    judged = "one seed only: no standard deviation to judge the difference against"
  elif abs(diff) > noise:
    judged = f"larger than the seeds' standard deviation ({noise:.3f})"
  else:
    judged = f"within the seeds' standard deviation ({noise:.3f}): no measurable difference"
  return (f"Tiny-object AP, {init.replace('_', ' ')}: best MDSSD variant `{best}` {mean:.3f} against "
          f"`ssd_fine` {fine_mean:.3f}, a difference of {diff:+.3f}, {judged}.")


CONTEXT_EXAMPLES = os.path.join("docs", "study_context_examples.png")


def context_examples(path=CONTEXT_EXAMPLES, indices=(0, 1, 2, 3)):
  """docs/study.md's picture of the context data: the same generated image in both scenes (rows),
  tiny objects boxed with their class, the marker's corner left as drawn."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from mdssd_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  spec = synthetic.SyntheticSpec(image_size_px=192, min_object_px=8, max_object_px=40,
                                 max_objects=24, max_distractors=2, context=True)
  fig, axes = plt.subplots(2, len(indices), figsize=(3.2 * len(indices), 6.8), squeeze=False)
  colours = {"stripes": "#ffdd00", "checks": "#00e5ff"}
  for col, index in enumerate(indices):
    for row, scene in enumerate(range(len(synthetic.SCENE_KINDS))):
      image, boxes, labels = synthetic.render_context(spec, "test", index, scene=scene)
      ax = axes[row, col]
      ax.imshow(image)
      for (x0, y0, x1, y1), label in zip(boxes, labels):
        name = spec.class_names[label]
        if "@" not in name:
          continue
        colour = colours[name.split("@")[1]]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, lw=1))
        ax.text(x0, y0 - 1, name, color=colour, fontsize=5.5)
      ax.set_title(f"test image {index}, scene: {synthetic.SCENE_KINDS[scene]}", fontsize=8)
      ax.axis("off")
  fig.suptitle("Context data: the same image in both scenes. Tiny shapes (boxed) are identical "
               "pixel for pixel;\ntheir class follows the texture in the corner "
               f"(>= {synthetic.CONTEXT_MARGIN_PX:g} px away). Plus, ring, diamond (unboxed) keep "
               "their own class.", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot(results, path):
  """Learning curves (mAP and tiny AP against steps), mean ± std band over seeds, one panel row
  per (data, regime)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  grouped = groups(results)
  if not grouped:
    return None
  fig, axes = plt.subplots(len(grouped), 2, figsize=(10, 3.4 * len(grouped)), squeeze=False)
  colours = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for row, ((data, init), by_variant) in enumerate(grouped.items()):
    for col, key in enumerate(("all", "tiny")):
      ax = axes[row, col]
      for variant, runs in by_variant.items():
        steps = sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in runs)))
        values = np.array([[next(p[key] for p in r["curve"] if p["step"] == s) for s in steps]
                           for r in runs], dtype=float)
        mean = np.nanmean(values, axis=0)
        ax.plot(steps, mean, marker=".", color=colours[variant], label=f"{variant} (n={len(runs)})")
        if len(runs) > 1:
          std = np.nanstd(values, axis=0, ddof=1)
          ax.fill_between(steps, mean - std, mean + std, color=colours[variant], alpha=0.2)
      ax.set_title(f"{'mAP@0.5' if key == 'all' else 'AP@0.5, tiny objects (< 16 px)'}: "
                   f"{data} data, {init.replace('_', ' ')}", fontsize=9)
      ax.set_xlabel("training step")
      ax.set_ylim(0, 1)
      ax.grid(alpha=0.3)
      if col == 0:
        ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None,
                      help=f"results JSON (kept between sittings); default {DEFAULT_OUT}, with "
                           f"--settled {SETTLED_OUT}")
  parser.add_argument("--settled", action="store_true",
                      help="the settled study: a learning-rate sweep per variant chosen on held-out "
                           "training images, then the other seeds at each variant's rate")
  parser.add_argument("--context", action="store_true",
                      help="the context study: the settled study's method on the context data "
                           f"(a tiny object's class told by a far scene marker), into {CONTEXT_OUT}")
  parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help="one training folder per run here")
  parser.add_argument("--steps", type=int, default=0,
                      help="with --settled: every variant and seed at its chosen rate (from the "
                           "settled study's results, --rates_from) for this many steps instead of "
                           "the sweep's 600, into its own results file")
  parser.add_argument("--rates_from", default=SETTLED_OUT,
                      help="the settled study's results whose chosen rates --steps uses")
  parser.add_argument("--plot", default=None,
                      help=f"learning-curve plot; default {DEFAULT_PLOT} for the default --out, "
                           "else the --out path with .png")
  parser.add_argument("--quick", action="store_true", help="the study's machinery at toy size")
  parser.add_argument("--data", default=None, help="comma-separated: shape (default), colour")
  parser.add_argument("--variants", default=None,
                      help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
  parser.add_argument("--data_dir", default="", help="TFDS folder for the generated data (default: TFDS's)")
  parser.add_argument("--table", action="store_true", help="only print the tables and redraw the plot")
  parser.add_argument("--workers", type=int, default=1,
                      help="runs trained side by side, each in its own process pinned to a core "
                           "(for machines with more cores than one small run keeps busy)")
  parser.add_argument("--ablation", action="store_true",
                      help="only the branch ablation of the finished MDSSD runs (the full study ends "
                           "with it), then the tables")
  parser.add_argument("--one_run", default=None, help=argparse.SUPPRESS)  # a child's run (JSON)
  args = parser.parse_args()
  if args.one_run:
    sys.exit(one_run(json.loads(args.one_run)))
  if args.workers < 1:
    parser.error(f"--workers={args.workers}: must be at least 1")
  if args.context:
    args.settled = True
    if args.rates_from == SETTLED_OUT:
      args.rates_from = CONTEXT_OUT
  if args.steps and not args.settled:
    parser.error("--steps needs --settled")
  sweep_out = CONTEXT_OUT if args.context else SETTLED_OUT
  settled_out = sweep_out if not args.steps else steps_out(
      args.steps, "context" if args.context else "settled")
  args.out = args.out or (settled_out if args.settled else DEFAULT_OUT)
  defaults = {os.path.abspath(DEFAULT_OUT): DEFAULT_PLOT, os.path.abspath(SETTLED_OUT): SETTLED_PLOT,
              os.path.abspath(CONTEXT_OUT): CONTEXT_PLOT}
  plot_path = args.plot or defaults.get(os.path.abspath(args.out),
                                        os.path.splitext(args.out)[0] + ".png")
  if not args.table:
    if args.context:
      budget = (dataclasses.replace(QUICK_SETTLED, data=("context",)) if args.quick else CONTEXT)
      if args.steps:
        budget = at_steps(budget, args.steps, load_results(args.rates_from))
    elif args.settled:
      budget = QUICK_SETTLED if args.quick else SETTLED
      if args.steps:
        budget = at_steps(budget, args.steps, load_results(args.rates_from))
    else:
      budget = QUICK if args.quick else FULL
    if args.data:
      budget = dataclasses.replace(budget, data=tuple(args.data.split(",")))
    if args.variants:
      chosen = tuple(args.variants.split(","))
      unknown = [v for v in chosen if v not in VARIANTS]
      if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
      budget = dataclasses.replace(
          budget, variants=chosen,
          trained_trunk_variants=tuple(v for v in TRAINED_TRUNK_VARIANTS
                                       if v in chosen and budget.trained_trunk_variants))
    if not args.ablation:
      run_study(budget, args.out, args.workdir, args.data_dir, args.workers)
    if not _Stop.requested:
      run_ablations(args.out, args.workdir, args.data_dir)
  if args.context:
    print(f"examples of the data: {context_examples()}")
  results = load_results(args.out)
  print(tables(results))
  if plot(results, plot_path):
    print(f"\nplot: {plot_path}")


if __name__ == "__main__":
  main()
