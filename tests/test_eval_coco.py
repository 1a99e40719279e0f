"""COCO wrapper against pycocotools' COCOeval called directly on a hand-built annotation dict."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mdssd_jax.metrics import coco


def _random_case(rng, num_images=30, num_labels=4):
  predictions, ground_truths = [], []
  for _ in range(num_images):
    n = rng.integers(0, 6)
    xy = rng.uniform(0, 500, size=(n, 2))
    wh = rng.uniform(4, 250, size=(n, 2))      # spans COCO's small / medium / large areas
    boxes = np.concatenate([xy, xy + wh], axis=1)
    labels = rng.integers(1, num_labels + 1, size=n)
    crowd = rng.random(n) < 0.1
    ground_truths.append(dict(boxes=boxes, labels=labels, difficult=crowd))
    k = rng.integers(0, 12)
    near = boxes[rng.integers(0, max(n, 1), size=min(k, 2 * n))] if n else np.zeros((0, 4))
    near = near + rng.normal(0, 6, size=near.shape)
    cxy = rng.uniform(0, 500, size=(k, 2))
    clutter = np.concatenate([cxy, cxy + rng.uniform(4, 200, size=(k, 2))], axis=1)
    pboxes = np.concatenate([near, clutter])
    plabels = rng.integers(1, num_labels + 1, size=len(pboxes))
    predictions.append(dict(boxes=pboxes, scores=rng.random(len(pboxes)), labels=plabels))
  return predictions, ground_truths


def _direct_pycocotools(predictions, ground_truths, cat_of=lambda l: int(l), categories=None):
  """The test's own COCO dict + loadRes(list) + COCOeval, as a user would call pycocotools."""
  images, anns, results = [], [], []
  for i, (p, g) in enumerate(zip(predictions, ground_truths)):
    images.append({"id": 100 + i})
    for b, l, c in zip(g["boxes"], g["labels"], g["difficult"]):
      w, h = b[2] - b[0], b[3] - b[1]
      anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": cat_of(l),
                   "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": int(c)})
    for b, s, l in zip(p["boxes"], p["scores"], p["labels"]):
      results.append({"image_id": 100 + i, "category_id": cat_of(l),
                      "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
  if categories is None:
    categories = sorted({a["category_id"] for a in anns} | {r["category_id"] for r in results})
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c} for c in categories]}
    gt.createIndex()
    dt = gt.loadRes(results)
    e = COCOeval(gt, dt, "bbox")
    e.evaluate()
    e.accumulate()
    e.summarize()
  return e.stats


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pycocotools_directly(seed):
  rng = np.random.default_rng(seed)
  predictions, ground_truths = _random_case(rng)
  ours = coco.evaluate(predictions, ground_truths)
  # Image ids differ (ours count from 1, the direct call from 100): the numbers must not care.
  expected = _direct_pycocotools(predictions, ground_truths)
  got = np.array([ours[name] for name in coco.STAT_NAMES])
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
  assert 0.0 < ours["AP"] < 1.0


def test_category_mapping_and_crowd_flag():
  rng = np.random.default_rng(3)
  predictions, ground_truths = _random_case(rng)
  mapping = {1: 7, 2: 3, 3: 90, 4: 12}
  ours = coco.evaluate(predictions, ground_truths, label_to_category_id=mapping)
  expected = _direct_pycocotools(predictions, ground_truths, cat_of=lambda l: mapping[int(l)],
                                 categories=sorted(mapping.values()))
  np.testing.assert_allclose([ours[n] for n in coco.STAT_NAMES], expected, atol=1e-12)
  assert sorted(ours["per_class"]) == [1, 2, 3, 4]
  # An explicit iscrowd overrides `difficult`: with no crowd at all the numbers change.
  no_crowd = [dict(g, iscrowd=np.zeros(len(g["labels"]), bool)) for g in ground_truths]
  plain = coco.evaluate(predictions, no_crowd, label_to_category_id=mapping)
  expected_plain = _direct_pycocotools(
      predictions, [dict(g, difficult=np.zeros(len(g["labels"]), bool)) for g in ground_truths],
      cat_of=lambda l: mapping[int(l)], categories=sorted(mapping.values()))
  np.testing.assert_allclose([plain[n] for n in coco.STAT_NAMES], expected_plain, atol=1e-12)
  assert plain["AP"] != ours["AP"]
  with pytest.raises(KeyError, match="label 4 has no COCO category id"):
    coco.evaluate(predictions, ground_truths, label_to_category_id={1: 1, 2: 2, 3: 3})


def test_ground_truth_as_detections_gives_ap_one():
  rng = np.random.default_rng(5)
  _, ground_truths = _random_case(rng)
  ground_truths = [dict(g, difficult=np.zeros(len(g["labels"]), bool)) for g in ground_truths]
  perfect = [dict(boxes=g["boxes"], scores=np.linspace(1, 0.5, len(g["labels"])), labels=g["labels"])
             for g in ground_truths]
  result = coco.evaluate(perfect, ground_truths)
  for name in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR10", "AR100"):
    assert result[name] == pytest.approx(1.0), name


def test_evaluator_interface_and_no_detections():
  from mdssd_jax.metrics import make_metric
  import ml_collections
  rng = np.random.default_rng(9)
  predictions, ground_truths = _random_case(rng, num_images=12)
  ev = make_metric(ml_collections.ConfigDict(dict(type="coco", coco_backend="pycocotools")),
                   ["a", "b", "c", "d"])
  ev.add(predictions[:5], ground_truths[:5])
  ev.add(predictions[5:], ground_truths[5:])
  metrics = ev.compute()
  assert list(metrics) == list(coco.STAT_NAMES)
  direct = coco.evaluate(predictions, ground_truths)
  assert metrics == {n: direct[n] for n in coco.STAT_NAMES}
  assert "AP50" in ev.table()
  # No detections at all (loadRes cannot take an empty list): zeros, not a crash.
  empty = [dict(boxes=np.zeros((0, 4)), scores=np.zeros(0), labels=np.zeros(0, int))] * 12
  ev.reset()
  ev.add(empty, ground_truths)
  assert ev.compute()["AP"] == 0.0


def test_annotation_area_decides_small_medium_large():
  """Objects whose box is above 32^2 px but whose annotated (segment) area is below it are small,
  as pycocotools counts them; -1 falls back to the box area."""
  rng = np.random.default_rng(7)
  predictions, ground_truths = _random_case(rng, num_images=40)
  for g in ground_truths:
    w, h = g["boxes"][:, 2] - g["boxes"][:, 0], g["boxes"][:, 3] - g["boxes"][:, 1]
    # A thin diagonal object: its segment covers a fifth of its box; some objects carry no area.
    g["area"] = np.where(rng.random(len(w)) < 0.8, 0.2 * w * h, -1.0)
  moved = sum(int(np.sum((a >= 0) & (a < 32 ** 2) & (w * h > 32 ** 2)))
              for g in ground_truths
              for a, w, h in [(g["area"], g["boxes"][:, 2] - g["boxes"][:, 0],
                               g["boxes"][:, 3] - g["boxes"][:, 1])])
  assert moved >= 5   # the case really moves objects from medium to small

  def direct(with_area):
    """pycocotools on the test's own annotation dicts: area = the given area or the box area."""
    images, anns, results = [], [], []
    for i, (p, g) in enumerate(zip(predictions, ground_truths)):
      images.append({"id": i + 1})
      for b, l, c, a in zip(g["boxes"], g["labels"], g["difficult"], g["area"]):
        w, h = b[2] - b[0], b[3] - b[1]
        anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(l),
                     "bbox": [b[0], b[1], w, h], "area": a if (with_area and a >= 0) else w * h,
                     "iscrowd": int(c)})
      for b, s, l in zip(p["boxes"], p["scores"], p["labels"]):
        results.append({"image_id": i + 1, "category_id": int(l),
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
      gt = COCO()
      gt.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c} for c in range(1, 5)]}
      gt.createIndex()
      e = COCOeval(gt, gt.loadRes(results), "bbox")
      e.evaluate()
      e.accumulate()
      e.summarize()
    return e.stats

  ours = coco.evaluate(predictions, ground_truths)
  got = np.array([ours[name] for name in coco.STAT_NAMES])
  np.testing.assert_allclose(got, direct(with_area=True), rtol=0, atol=1e-12)
  by_box = direct(with_area=False)
  assert abs(by_box[3] - got[3]) > 1e-3   # AP_small differs from the box-area buckets

  evaluator = coco.CocoMetric(["a", "b", "c", "d"])
  evaluator.add(predictions, ground_truths)
  assert evaluator.compute()["AP_small"] == pytest.approx(got[3], abs=1e-12)
