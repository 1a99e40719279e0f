"""The small-object study's machinery (benchmarks/study_small_objects.py): the JSON it writes and
the tables made from it. Accuracy is not tested; the toy runs train for four steps."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import study_small_objects as study
from tests.conftest import ROOT

RUN_KEYS = {"variant", "family", "seed", "data", "init", "steps", "wall_s", "params", "gflops", "ap",
            "curve"}
# The smallest study that still has both regimes: ssd (the trunk's source) and one MDSSD variant.
QUICK_VARIANTS = ("ssd", "mdssd_bn")


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
  """Runs `--quick` on two variants into a tmp folder; returns (results dict, folder, stdout)."""
  # Two workers: the runs train side by side, and the trained-trunk run must wait for its source.
  return _run_study(tmp_path_factory.mktemp("study"), "study.json", "--quick", "--workers=2",
                    f"--variants={','.join(QUICK_VARIANTS)}")


def _run_study(folder, out_name, *flags):
  """Runs the study script with `flags` into `folder`; returns (results dict, folder, stdout)."""
  out = os.path.join(folder, out_name)
  cmd = [sys.executable, "-m", "benchmarks.study_small_objects", *flags, f"--out={out}",
         f"--workdir={os.path.join(folder, 'runs')}", f"--data_dir={os.path.join(folder, 'tfds')}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  with open(out) as f:
    return json.load(f), str(folder), proc.stdout


def test_quick_study_writes_one_valid_run_per_variant_regime_and_seed(quick_study):
  results, _, _ = quick_study
  assert results["recipe"]["loss.matching"] == "bipartite"
  assert results["recipe"]["augment.crop_sampler"] == "caffe"
  assert results["recipe"]["augment.hue_delta_deg"] == 36.0
  keys = [(r["variant"], r["init"], r["seed"], r["data"]) for r in results["runs"]]
  expected = [(v, "scratch", s, "shape") for v in QUICK_VARIANTS for s in study.QUICK.seeds]
  expected += [("mdssd_bn", "trained_trunk", s, "shape") for s in study.QUICK.seeds]
  assert sorted(keys) == sorted(expected)          # each exactly once
  for run in results["runs"]:
    assert set(run) == RUN_KEYS
    assert run["family"] == {"ssd": "ssd", "mdssd_bn": "mdssd"}[run["variant"]]
    assert run["steps"] == study.QUICK.steps
    assert run["params"] > 0 and run["gflops"] > 0 and run["wall_s"] > 0
    assert set(run["ap"]) == {"all", "tiny", "small", "medium"}
    for value in run["ap"].values():
      assert 0.0 <= value <= 1.0
    steps = [p["step"] for p in run["curve"]]
    assert steps == list(range(study.QUICK.eval_every_steps, study.QUICK.steps + 1,
                               study.QUICK.eval_every_steps))
    for point in run["curve"]:
      assert 0.0 <= point["all"] <= 1.0 and 0.0 <= point["tiny"] <= 1.0
    assert run["curve"][-1]["all"] == run["ap"]["all"]
    assert run["curve"][-1]["tiny"] == run["ap"]["tiny"]
  by_variant = {r["variant"]: r for r in results["runs"] if r["init"] == "scratch"}
  # The Fusion Blocks add parameters and FLOPs to the same trunk.
  assert by_variant["mdssd_bn"]["params"] > by_variant["ssd"]["params"]
  assert by_variant["mdssd_bn"]["gflops"] > by_variant["ssd"]["gflops"]


def test_quick_study_ablates_the_branches_of_every_mdssd_run(quick_study):
  results, _, _ = quick_study
  runs = {(r["variant"], r["init"], r["seed"]): r for r in results["runs"] if r["family"] == "mdssd"}
  ablation = {(a["variant"], a["init"], a["seed"]): a for a in results["ablation"]}
  assert set(ablation) == set(runs) and len(ablation) == len(results["ablation"])
  for key, entry in ablation.items():
    assert set(entry) == {"variant", "seed", "data", "init", "intact", "deep_off", "shallow_off"}
    for k in ("all",) + study.BUCKETS:
      # "intact" re-evaluates the run's last checkpoint: the run's own final numbers.
      if runs[key]["ap"][k] is None:
        assert entry["intact"][k] is None
      else:
        assert entry["intact"][k] == pytest.approx(runs[key]["ap"][k], abs=1e-6)
      for state in ("deep_off", "shallow_off"):
        assert entry[state][k] is None or 0.0 <= entry[state][k] <= 1.0


def test_quick_study_rerun_skips_finished_runs_and_table_redraws_plot(quick_study):
  results, folder, _ = quick_study
  out = os.path.join(folder, "study.json")
  cmd = [sys.executable, "-m", "benchmarks.study_small_objects", "--quick",
         f"--variants={','.join(QUICK_VARIANTS)}", f"--out={out}",
         f"--workdir={os.path.join(folder, 'runs')}", f"--data_dir={os.path.join(folder, 'tfds')}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "== shape_" not in proc.stdout               # nothing trained again
  with open(out) as f:
    assert json.load(f) == results
  plot = os.path.join(folder, "table.png")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.study_small_objects", "--table",
                         f"--out={out}", f"--plot={plot}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert os.path.getsize(plot) > 0
  assert "| mdssd_bn | mdssd |" in proc.stdout and "**shape data, trained trunk**" in proc.stdout


# ---- the settled study: a learning-rate sweep chosen on held-out training images ------------------

SETTLED_VARIANT = "mdssd_bn_shallow"


@pytest.fixture(scope="module")
def settled_study(tmp_path_factory):
  """`--settled --quick` on one variant: two rates on seed 0, then seed 1 at the chosen one."""
  return _run_study(tmp_path_factory.mktemp("settled"), "settled.json", "--settled", "--quick",
                    "--workers=2", f"--variants={SETTLED_VARIANT}")


def test_settled_study_sweeps_on_the_first_seed_and_trains_the_others_at_the_best_rate(settled_study):
  results, _, stdout = settled_study
  budget = study.QUICK_SETTLED
  assert results["budget"]["lrs"] == list(budget.lrs)
  assert results["budget"]["val_images"] == budget.val_images
  sweep = {r["lr"]: r for r in results["runs"] if r["seed"] == 0}
  assert sorted(sweep) == sorted(budget.lrs)
  # The rate with the best validation mAP (the smaller one on a tie), chosen here from the JSON.
  best = max(sorted(budget.lrs), key=lambda lr: sweep[lr]["val"]["all"])
  others = [r for r in results["runs"] if r["seed"] != 0]
  assert [(r["seed"], r["lr"]) for r in others] == [(1, best)]
  for run in results["runs"]:
    assert set(run) == RUN_KEYS | {"lr", "val", "val_curve"}
    assert run["variant"] == SETTLED_VARIANT and run["family"] == "mdssd"
    assert [p["step"] for p in run["val_curve"]] == [p["step"] for p in run["curve"]]
    assert run["val_curve"][-1]["all"] == run["val"]["all"]
    for value in run["val"].values():
      assert value is None or 0.0 <= value <= 1.0
  # The tables compare the chosen rate's runs, and the sweep table marks the choice.
  assert f"| {SETTLED_VARIANT} | mdssd |" in stdout
  row = next(l for l in stdout.splitlines() if l.startswith(f"| {SETTLED_VARIANT} | mdssd |"))
  assert f" {best:g} |" in row and "| 2 | 4 |" in row           # 2 seeds, 4 steps
  sweep_row = next(l for l in stdout.splitlines() if l.startswith(f"| {SETTLED_VARIANT} | ")
                   and l.rstrip().endswith(f"| {best:g} |"))
  assert sweep_row.count("**") == 2
  # No branch ablation: a block without its deep branch has none to switch off.
  assert not results.get("ablation")


def test_settled_runs_train_on_the_training_images_less_the_validation_ones(settled_study):
  """The held-out images are the last val_images of the generated training split, none of them in
  the training split the runs read (compared by their encoded bytes)."""
  _, folder, _ = settled_study
  from mdssd_jax.data import registry
  budget = study.QUICK_SETTLED
  config = study.variant_config(SETTLED_VARIANT, "shape", budget, 0, os.path.join(folder, "tfds"),
                                lr=budget.lrs[0])
  assert config.train.base_lr == budget.lrs[0]
  info = registry.get_dataset(config.data)
  read = lambda split: [bytes(r["image"]) for r in registry.open_split(info, config.data.data_dir, split)]
  everything = read("train")
  train, val = read(config.data.train_split), read(config.evals[study.VAL_EVALUATOR].split)
  assert len(everything) == budget.num_train and len(val) == budget.val_images
  assert train + val == everything
  assert not set(train) & set(val)
  assert config.evals[study.EVALUATOR].split in ("", config.data.eval_split)   # the test split


def test_settled_verdicts_answer_the_three_questions_with_their_sizes():
  """Standard error of a difference of means, sqrt(s_a^2/n_a + s_b^2/n_b), computed here."""
  tiny = {"ssd_fine": [0.60, 0.64, 0.62], "mdssd_bn": [0.80, 0.84, 0.82],
          "mdssd_bn_shallow": [0.58, 0.70, 0.64]}
  by_variant = {v: [_fake_run(v, "mdssd" if v.startswith("mdssd") else v, s, t)
                    for s, t in enumerate(ts)] for v, ts in tiny.items()}
  lines = study.settled_verdicts(by_variant)
  assert len(lines) == 3

  def se(a, b):
    return math.sqrt(np.var(tiny[a], ddof=1) / 3 + np.var(tiny[b], ddof=1) / 3)

  assert "`mdssd_bn` − `ssd_fine` = +0.200" in lines[0] and f"({se('mdssd_bn', 'ssd_fine'):.3f})" in lines[0]
  assert lines[0].endswith(": yes.")
  assert "`mdssd_bn` − `mdssd_bn_shallow` = +0.180" in lines[1] and lines[1].endswith(": yes.")
  # +0.020 against a spread of 0.06: no measurable difference.
  assert "= +0.020" in lines[2] and "no measurable difference" in lines[2]
  assert "not both run yet" in study.settled_verdicts({"ssd_fine": by_variant["ssd_fine"]})[0]


def test_late_change_is_the_last_quarter_of_the_curve():
  curve = [dict(step=s, all=a) for s, a in ((100, 0.1), (200, 0.5), (300, 0.8), (400, 0.85))]
  assert study.late_change(curve) == pytest.approx(0.85 - 0.8)     # from step 300 = 0.75 * 400
  assert study.late_change(curve[-1:]) is None


def _fake_run(variant, family, seed, tiny, all_ap=0.5):
  return dict(variant=variant, family=family, seed=seed, data="shape", init="scratch", steps=10,
              wall_s=60.0, params=1000, gflops=0.1,
              ap=dict(all=all_ap, tiny=tiny, small=0.5, medium=0.5),
              curve=[dict(step=5, all=all_ap / 2, tiny=tiny / 2), dict(step=10, all=all_ap, tiny=tiny)])


def test_tables_report_mean_sample_std_and_verdict(tmp_path):
  fine = [0.40, 0.44, 0.42]
  fused = [0.60, 0.50, 0.55]
  runs = [_fake_run("ssd_fine", "ssd_fine", s, t) for s, t in enumerate(fine)]
  runs += [_fake_run("mdssd_bn", "mdssd", s, t) for s, t in enumerate(fused)]
  runs += [_fake_run("mdssd", "mdssd", s, 0.1) for s in range(3)]
  results = {"recipe": {"loss.matching": "bipartite"}, "budget": None, "runs": runs}
  text = study.tables(results)

  def sample_std(xs):   # the textbook formula, n - 1 in the denominator
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

  assert f"{sum(fused) / 3:.3f} ± {sample_std(fused):.3f}" in text     # 0.550 ± 0.050
  assert f"{sum(fine) / 3:.3f} ± {sample_std(fine):.3f}" in text       # 0.420 ± 0.020
  assert "best MDSSD variant `mdssd_bn` 0.550" in text
  assert "+0.130" in text and "larger than the seeds' standard deviation (0.050)" in text
  # A difference inside the noise is called so.
  runs_close = [_fake_run("ssd_fine", "ssd_fine", s, t) for s, t in enumerate([0.5, 0.6, 0.4])]
  runs_close += [_fake_run("mdssd_bn", "mdssd", s, t) for s, t in enumerate([0.52, 0.62, 0.42])]
  assert "no measurable difference" in study.tables({"recipe": {}, "budget": None,
                                                     "runs": runs_close})
  ablation = [dict(variant="mdssd_bn", seed=s, data="shape", init="scratch",
                   intact=dict(all=0.5, tiny=t, small=0.5, medium=0.5),
                   deep_off=dict(all=0.4, tiny=t - 0.1, small=0.4, medium=0.4),
                   shallow_off=dict(all=0.1, tiny=0.0, small=0.1, medium=0.1))
              for s, t in enumerate(fused)]
  text = study.tables(dict(results, ablation=ablation))
  row = next(line for line in text.splitlines() if line.startswith("| mdssd_bn | 3 |"))
  assert row.split(" | ")[2:] == ["0.500 ± 0.000", "0.400 ± 0.000", "0.100 ± 0.000",
                                  f"{sum(fused) / 3:.3f} ± {sample_std(fused):.3f}",
                                  f"{sum(fused) / 3 - 0.1:.3f} ± {sample_std(fused):.3f}",
                                  "0.000 ± 0.000 |"]
  path = study.plot(results, str(tmp_path / "p.png"))
  assert os.path.getsize(path) > 0
  assert np.isclose(study._mean_std(fused)[1], np.std(fused, ddof=1))


def test_variants_share_heads_and_default_boxes():
  """ssd_fine and the MDSSD variants: same default boxes and head widths; ssd lacks the finest rung."""
  from mdssd_jax.core import anchors as anchors_lib
  from mdssd_jax import models
  boxes, head_channels = {}, {}
  for variant in study.VARIANTS:
    config = study.variant_config(variant, "shape", study.FULL, 0)
    boxes[variant] = anchors_lib.from_config(config.anchors, config.model.input_size_px)
    model = models.build_model(config)
    _, _, maps = models.abstract_forward(model, config.model.input_size_px)
    head_channels[variant] = [tuple(m.shape[1:]) for m in maps]
  for variant in ("mdssd", "mdssd_bn", "mdssd_bn_bilinear", "mdssd_bn_shallow"):
    np.testing.assert_array_equal(boxes[variant], boxes["ssd_fine"])
    assert head_channels[variant] == head_channels["ssd_fine"]
  # ssd: the same boxes without the 48x48 map's (48 * 48 cells, 4 boxes each: ratios 1, 1', 2, 1/2).
  assert len(boxes["ssd"]) == len(boxes["ssd_fine"]) - 48 * 48 * 4
  np.testing.assert_array_equal(boxes["ssd"], boxes["ssd_fine"][48 * 48 * 4:])


def test_mdssd_is_the_paper_fusion_on_a_batch_norm_trunk():
  """mdssd: batch norm in the trunk, none in the Fusion Blocks; mdssd_bn: in both."""
  from mdssd_jax import models
  for variant, fusion_bn in (("mdssd", False), ("mdssd_bn", True)):
    config = study.variant_config(variant, "shape", study.FULL, 0)
    variables, _, _ = models.abstract_forward(models.build_model(config), config.model.input_size_px)
    assert "bn" in variables["params"]["vgg"]["conv1_1"]
    fusion = variables["params"]["fusion1"]
    assert any(k.endswith("_bn") for k in fusion) == fusion_bn
    assert ("bias" in fusion["out_conv"]) == (not fusion_bn)


def test_runs_follow_the_study_schedule_stretched_to_their_steps():
  """Warm-up and learning-rate decays sit at the same fractions of every run: warm-up 50 and decays
  at 450 and 550 of 600 steps (the 600-step demo schedule the studies ran on)."""
  for init, steps in (("scratch", study.FULL.steps), ("trained_trunk", study.FULL.trained_trunk_steps),
                      ("scratch", 1200)):
    budget = dataclasses.replace(study.FULL, steps=steps) if steps == 1200 else study.FULL
    train_cfg = study.variant_config("mdssd_bn", "shape", budget, 0, init=init).train
    assert train_cfg.num_steps == steps
    assert train_cfg.warmup_steps == round(50 * steps / 600)
    assert list(train_cfg.lr_decay_steps) == [round(450 * steps / 600), round(550 * steps / 600)]


@pytest.mark.parametrize("branch", study.BRANCHES)
def test_branch_off_makes_a_fusion_block_blind_to_that_branch(branch):
  """With a branch switched off, changing that branch's input map leaves the block's output as it
  is; the other branch still matters; the trained parameters are left as they were."""
  import jax
  from mdssd_jax import models
  block = models.FusionBlock(deconv_features=4, out_features=3, batch_norm=True)
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  shallow = jax.random.normal(keys[0], (2, 12, 12, 5))
  deep = jax.random.normal(keys[1], (2, 2, 2, 6))     # 2 -> 3 -> 6 -> 12
  variables = block.init(keys[2], shallow, deep)
  params = {"fusion1": variables["params"], "head": {"kernel": np.ones(3)}}
  off = study.branch_off(params, branch)
  apply = lambda p, s, d: block.apply({"params": p["fusion1"], "batch_stats": variables["batch_stats"]},
                                      s, d)
  other_shallow = jax.random.normal(keys[3], shallow.shape)
  other_deep = jax.random.normal(keys[4], deep.shape)
  changed = (shallow, other_deep) if branch == "deep" else (other_shallow, deep)
  kept = (other_shallow, deep) if branch == "deep" else (shallow, other_deep)
  np.testing.assert_array_equal(apply(off, shallow, deep), apply(off, *changed))
  assert not np.allclose(apply(off, shallow, deep), apply(off, *kept))
  assert not np.allclose(apply(params, shallow, deep), apply(params, *changed))
  assert np.all(np.asarray(params["fusion1"][f"{branch}_norm"]["scale"]) == 20.0)  # not modified
  assert off["head"] is params["head"]


def test_at_steps_trains_every_seed_at_each_variants_chosen_rate():
  """--settled --steps: the rates come from the sweep's validation mAP, chosen here by hand."""
  budget = study.QUICK_SETTLED
  val = {("ssd_fine", 2e-3): 0.4, ("ssd_fine", 1e-2): 0.7,
         ("mdssd_bn_shallow", 2e-3): 0.6, ("mdssd_bn_shallow", 1e-2): 0.6}   # a tie: the smaller
  runs = [dict(_fake_run(v, "x", 0, 0.5), lr=lr, val=dict(all=a, tiny=0.1, small=0.1, medium=0.1))
          for (v, lr), a in val.items()]
  longer = study.at_steps(budget, 40, {"runs": runs})
  assert dict(longer.variant_lrs) == {"ssd_fine": 1e-2, "mdssd_bn_shallow": 2e-3}
  assert longer.steps == 40 and longer.eval_every_steps == 5 and longer.lrs == ()
  assert study.planned_runs(longer) == [
      (v, "shape", "scratch", seed, dict(longer.variant_lrs)[v])
      for seed in budget.seeds for v in budget.variants]
  with pytest.raises(ValueError, match="mdssd_bn_shallow"):
    study.at_steps(budget, 40, {"runs": runs[:2]})
