"""VOC evaluator against an independent per-detection loop that follows the devkit's voc_eval.py."""

import numpy as np
import pytest

from mdssd_jax.metrics import voc


# ---- independent reference: voc_eval.py's logic, one detection at a time ---------------------------

def _ref_voc_ap(rec, prec, use_07_metric):
  if use_07_metric:
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
      if np.sum(rec >= t) == 0:
        p = 0
      else:
        p = np.max(prec[rec >= t])
      ap = ap + p / 11.0
    return ap
  mrec = np.concatenate(([0.0], rec, [1.0]))
  mpre = np.concatenate(([0.0], prec, [0.0]))
  for i in range(mpre.size - 1, 0, -1):
    mpre[i - 1] = max(mpre[i - 1], mpre[i])
  i = np.where(mrec[1:] != mrec[:-1])[0]
  return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def _ref_class_ap(predictions, ground_truths, label, iou_threshold, use_07_metric):
  class_recs = {}
  npos = 0
  for img, g in enumerate(ground_truths):
    keep = np.asarray(g["labels"]) == label
    bbox = np.asarray(g["boxes"], float).reshape(-1, 4)[keep]
    difficult = np.asarray(g["difficult"], bool)[keep]
    npos += int(np.sum(~difficult))
    class_recs[img] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(bbox)}
  image_ids, confidence, boxes = [], [], []
  for img, p in enumerate(predictions):
    for b, s, l in zip(np.asarray(p["boxes"], float).reshape(-1, 4), p["scores"], p["labels"]):
      if l == label:
        image_ids.append(img)
        confidence.append(float(s))
        boxes.append(b)
  if npos == 0:
    return None
  order = np.argsort(-np.asarray(confidence), kind="stable")
  nd = len(order)
  tp = np.zeros(nd)
  fp = np.zeros(nd)
  for d in range(nd):
    r = class_recs[image_ids[order[d]]]
    bb = boxes[order[d]]
    ovmax = -np.inf
    bbgt = r["bbox"]
    if bbgt.size > 0:
      ixmin = np.maximum(bbgt[:, 0], bb[0])
      iymin = np.maximum(bbgt[:, 1], bb[1])
      ixmax = np.minimum(bbgt[:, 2], bb[2])
      iymax = np.minimum(bbgt[:, 3], bb[3])
      iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
      ih = np.maximum(iymax - iymin + 1.0, 0.0)
      inters = iw * ih
      uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
             + (bbgt[:, 2] - bbgt[:, 0] + 1.0) * (bbgt[:, 3] - bbgt[:, 1] + 1.0) - inters)
      overlaps = inters / uni
      ovmax = np.max(overlaps)
      jmax = np.argmax(overlaps)
    if ovmax > iou_threshold:
      if not r["difficult"][jmax]:
        if not r["det"][jmax]:
          tp[d] = 1.0
          r["det"][jmax] = True
        else:
          fp[d] = 1.0
    else:
      fp[d] = 1.0
  fp = np.cumsum(fp)
  tp = np.cumsum(tp)
  rec = tp / float(npos)
  prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
  return _ref_voc_ap(rec, prec, use_07_metric)


def _random_case(rng, num_images=40, num_classes=5):
  """Clustered boxes on a small integer grid so that overlaps, duplicates and ties of IoU happen."""
  predictions, ground_truths = [], []
  for _ in range(num_images):
    n_gt = rng.integers(0, 5)
    xy = rng.integers(0, 60, size=(n_gt, 2)).astype(float)
    wh = rng.integers(4, 40, size=(n_gt, 2)).astype(float)
    gt_boxes = np.concatenate([xy, xy + wh], axis=1)
    # Class 5 never has ground truth; class 4 only difficult ground truth.
    gt_labels = rng.integers(1, num_classes - 1, size=n_gt)
    difficult = rng.random(n_gt) < 0.2
    if rng.random() < 0.2 and n_gt:
      gt_labels[0] = 4
      difficult[0] = True
    ground_truths.append(dict(boxes=gt_boxes, labels=gt_labels, difficult=difficult))
    if rng.random() < 0.15:          # an image with no detections at all
      predictions.append(dict(boxes=np.zeros((0, 4)), scores=np.zeros(0), labels=np.zeros(0, int)))
      continue
    # Jittered copies of ground truth (several per box: duplicates) plus background clutter.
    copies = rng.integers(0, 3, size=n_gt)
    src = np.repeat(np.arange(n_gt), copies)
    jit = rng.integers(-6, 7, size=(len(src), 4)).astype(float)
    near = gt_boxes[src] + jit
    near[:, 2:] = np.maximum(near[:, 2:], near[:, :2] + 1)
    near_labels = np.where(rng.random(len(src)) < 0.85, gt_labels[src],
                           rng.integers(1, num_classes + 1, size=len(src)))
    n_bg = rng.integers(0, 6)
    bxy = rng.integers(0, 80, size=(n_bg, 2)).astype(float)
    bg = np.concatenate([bxy, bxy + rng.integers(3, 30, size=(n_bg, 2))], axis=1)
    boxes = np.concatenate([near, bg])
    labels = np.concatenate([near_labels, rng.integers(1, num_classes + 1, size=n_bg)]).astype(int)
    scores = rng.random(len(boxes))
    predictions.append(dict(boxes=boxes, scores=scores, labels=labels))
  return predictions, ground_truths


@pytest.mark.parametrize("use_07_metric", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_matches_devkit_loop_on_random_cases(seed, use_07_metric):
  rng = np.random.default_rng(seed)
  predictions, ground_truths = _random_case(rng)
  iou_threshold = 0.5 if seed % 2 == 0 else 0.3
  result = voc.evaluate(predictions, ground_truths, iou_threshold, use_07_metric)
  expected = {}
  for label in range(1, 6):
    ap = _ref_class_ap(predictions, ground_truths, label, iou_threshold, use_07_metric)
    if ap is not None:
      expected[label] = ap
  assert sorted(result["AP"]) == sorted(expected)
  assert 4 not in result["AP"] and 5 not in result["AP"]   # only difficult / no ground truth
  for label, ap in expected.items():
    assert result["AP"][label] == pytest.approx(ap, abs=1e-12), label
  assert result["mAP"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)


def test_hand_computed_11_point_ap():
  # One image, 4 ground truths of class 1; 5 detections in score order: TP, FP, TP, TP(dup->FP), FP.
  gts = [dict(boxes=np.array([[0, 0, 9, 9], [20, 0, 29, 9], [40, 0, 49, 9], [60, 0, 69, 9]], float),
              labels=np.array([1, 1, 1, 1]), difficult=np.zeros(4, bool))]
  preds = [dict(boxes=np.array([[0, 0, 9, 9],        # TP (gt 0), precision 1, recall .25
                                [100, 100, 110, 110], # FP, precision .5
                                [20, 0, 29, 9],       # TP (gt 1), precision 2/3, recall .5
                                [0, 0, 9, 9],         # duplicate of gt 0 -> FP, precision .5
                                [200, 0, 210, 9]],    # FP, precision .4
                               float),
                scores=np.array([0.9, 0.8, 0.7, 0.6, 0.5]), labels=np.ones(5, int))]
  # Recall reaches 0.5 at most: thresholds 0, .1, .2 -> max precision over rec>=t = 1.0;
  # .3, .4, .5 -> 2/3 (best at recall .5); .6 .. 1.0 -> 0. AP = (3 * 1 + 3 * 2/3) / 11.
  result = voc.evaluate(preds, gts, 0.5, use_07_metric=True)
  assert result["AP"][1] == pytest.approx((3 + 2) / 11)
  # Area: envelope 1.0 on recall [0, .25], 2/3 on (.25, .5] -> 0.25 + 0.5 / 3.
  result = voc.evaluate(preds, gts, 0.5, use_07_metric=False)
  assert result["AP"][1] == pytest.approx(0.25 + 0.5 / 3)


def test_difficult_ignored_and_duplicate_rule():
  # gt 0 difficult; gt 1 overlaps detection B less than gt 0 does.
  gts = [dict(boxes=np.array([[0, 0, 99, 99], [10, 0, 109, 99]], float), labels=np.array([1, 1]),
              difficult=np.array([False, False]))]
  # A matches gt 0 exactly (TP). B's best ground truth is gt 0 too (already claimed) -> FP, although
  # gt 1 (unclaimed) also overlaps B by more than 0.5: the devkit does not fall back to it.
  preds = [dict(boxes=np.array([[0, 0, 99, 99], [2, 0, 101, 99]], float), scores=np.array([0.9, 0.8]),
                labels=np.array([1, 1]))]
  result = voc.evaluate(preds, gts, 0.5, use_07_metric=False)
  assert result["AP"][1] == pytest.approx(0.5)   # recall 0.5 at precision 1, then an FP
  # The same with gt 0 difficult: A is ignored, B's best is gt 0 (difficult) -> ignored too; gt 1 is
  # never claimed, so recall stays 0 and AP 0; npos counts only gt 1.
  gts[0]["difficult"] = np.array([True, False])
  result = voc.evaluate(preds, gts, 0.5, use_07_metric=False)
  assert result["AP"][1] == 0.0 and result["num_positives"][1] == 1


def test_pixel_plus_one_convention():
  # Boxes [0,0,9,9] and [5,0,14,9]: with +1, intersection 5x10=50, union 150 -> 1/3; without, 4*9/(81*2-36).
  iou = voc.pairwise_iou_px(np.array([0, 0, 9, 9.0]), np.array([5, 0, 14, 9.0]))
  assert iou == pytest.approx(50 / 150)
  iou0 = voc.pairwise_iou_px(np.array([0, 0, 9, 9.0]), np.array([5, 0, 14, 9.0]), pixel_offset=0.0)
  assert iou0 == pytest.approx(36 / (81 + 81 - 36))


def test_equal_scores_keep_input_order():
  # Two detections of the same ground truth with equal scores: the first listed claims it (TP), the
  # second is the duplicate; with a third FP ranked before them the order decides the curve.
  gts = [dict(boxes=np.array([[0, 0, 9, 9]], float), labels=np.array([1]), difficult=np.array([False])),
         dict(boxes=np.zeros((0, 4)), labels=np.zeros(0, int), difficult=np.zeros(0, bool))]
  preds = [dict(boxes=np.array([[0, 0, 9, 9]], float), scores=np.array([0.5]), labels=np.array([1])),
           dict(boxes=np.array([[0, 0, 9, 9]], float), scores=np.array([0.5]), labels=np.array([1]))]
  # Image 0's detection comes first: TP at precision 1 -> AP 1.
  assert voc.evaluate(preds, gts, use_07_metric=False)["AP"][1] == pytest.approx(1.0)
  # Swap the images: the FP (image 0 now has no ground truth) comes first -> precision 1/2 at recall 1.
  assert voc.evaluate(preds, gts[::-1], use_07_metric=False)["AP"][1] == pytest.approx(0.5)


def test_no_detections_and_no_ground_truth():
  gts = [dict(boxes=np.array([[0, 0, 9, 9]], float), labels=np.array([2]), difficult=np.array([False]))]
  empty = [dict(boxes=np.zeros((0, 4)), scores=np.zeros(0), labels=np.zeros(0, int))]
  result = voc.evaluate(empty, gts)
  assert result == {"mAP": 0.0, "AP": {2: 0.0}, "num_positives": {2: 1}}
  result = voc.evaluate(empty, [dict(boxes=np.zeros((0, 4)), labels=np.zeros(0, int))])
  assert np.isnan(result["mAP"]) and result["AP"] == {}
  with pytest.raises(ValueError, match="one of each per image"):
    voc.evaluate(empty, gts + gts)


def test_evaluator_accumulates_and_names_classes():
  from mdssd_jax.metrics import make_metric
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(type="voc", iou_threshold=0.5, use_07_metric=True))
  rng = np.random.default_rng(7)
  predictions, ground_truths = _random_case(rng, num_images=20, num_classes=5)
  names = ["cat", "dog", "bird", "boat", "car"]
  ev = make_metric(cfg, names)
  ev.add(predictions[:7], ground_truths[:7])
  ev.add(predictions[7:], ground_truths[7:])
  metrics = ev.compute()
  direct = voc.evaluate(predictions, ground_truths, 0.5, True)
  assert metrics["mAP"] == pytest.approx(direct["mAP"])
  for label, ap in direct["AP"].items():
    assert metrics[f"AP/{names[label - 1]}"] == pytest.approx(ap)
  assert all(isinstance(v, float) for v in metrics.values())
  table = ev.table()
  assert "cat" in table and "mAP" in table
  with pytest.raises(ValueError, match=r"config.evals.main.type='vocc'(.|\n)*known: coco, tt100k, voc"):
    make_metric(ml_collections.ConfigDict(dict(type="vocc")), names, name="main")
  with pytest.raises(ValueError, match="config.evals.main.use_07_metric is missing"):
    make_metric(ml_collections.ConfigDict(dict(type="voc", iou_threshold=0.5)), names, name="main")


# ---- the evaluation loop (eval batches -> evaluator), with VOC as the metric -------------------------

def _to_batches(predictions, ground_truths, sizes, batch_size, max_boxes=8, slots=16, first_id=0):
  """Eval batches (docs/data_formats.md) plus a predict_fn that returns the given detections, normalised."""
  batches, table = [], {}
  for lo in range(0, len(ground_truths), batch_size):
    b = dict(image=np.zeros((batch_size, 4, 4, 3), np.uint8),
             boxes=np.zeros((batch_size, max_boxes, 4), np.float32),
             labels=np.zeros((batch_size, max_boxes), np.int32),
             difficult=np.zeros((batch_size, max_boxes), bool),
             image_id=np.full(batch_size, -1, np.int64), orig_size=np.ones((batch_size, 2), np.int32),
             batch_mask=np.zeros(batch_size, bool))
    for k, i in enumerate(range(lo, min(lo + batch_size, len(ground_truths)))):
      h, w = sizes[i]
      g = ground_truths[i]
      n = len(g["labels"])
      b["boxes"][k, :n] = g["boxes"] / [w, h, w, h]
      b["labels"][k, :n] = g["labels"]
      b["difficult"][k, :n] = g["difficult"]
      b["image_id"][k] = first_id + i
      b["orig_size"][k] = (h, w)
      b["batch_mask"][k] = True
      table[first_id + i] = (predictions[i], (h, w))
    batches.append(b)

  def predict_fn(batch):
    n = len(batch["image_id"])
    out = dict(boxes=np.random.rand(n, slots, 4).astype(np.float32),   # junk in invalid slots
               scores=np.random.rand(n, slots).astype(np.float32),
               classes=np.random.randint(1, 6, size=(n, slots)).astype(np.int32),
               valid=np.zeros((n, slots), bool))
    for k, image_id in enumerate(batch["image_id"]):
      if image_id not in table:
        out["valid"][k] = True     # padding examples get "detections" that must be dropped
        continue
      p, (h, w) = table[image_id]
      m = len(p["scores"])
      out["boxes"][k, :m] = p["boxes"] / [w, h, w, h]
      out["scores"][k, :m] = p["scores"]
      out["classes"][k, :m] = p["labels"]
      out["valid"][k, :m] = True
    return out

  return batches, predict_fn


def _case_for_loop(seed, num_images=23):
  rng = np.random.default_rng(seed)
  predictions, ground_truths = _random_case(rng, num_images=num_images)
  predictions = [dict(p, boxes=p["boxes"][:16], scores=p["scores"][:16], labels=p["labels"][:16])
                 for p in predictions]
  # Powers of two: normalised coordinates are exact in float32, so pixels round-trip exactly.
  sizes = [(int(rng.choice([128, 256])), int(rng.choice([128, 512]))) for _ in range(num_images)]
  return predictions, ground_truths, sizes


def test_evaluate_batches_drops_padding_and_matches_direct():
  from mdssd_jax.evaluation import loop
  predictions, ground_truths, sizes = _case_for_loop(11)
  batches, predict_fn = _to_batches(predictions, ground_truths, sizes, batch_size=4)
  ev = voc.VocMetric([f"c{i}" for i in range(1, 6)], 0.5, use_07_metric=False)
  seen = []
  metrics = loop.evaluate_batches(predict_fn, batches, ev,
                                  on_batch=lambda batch, arrays: seen.append(arrays["boxes_px"].shape))
  assert seen == [(4, 16, 4)] * len(batches)
  direct = voc.evaluate(predictions, ground_truths, 0.5, use_07_metric=False)
  assert ev.num_images == len(ground_truths)
  assert metrics["mAP"] == pytest.approx(direct["mAP"], abs=1e-12)
  for label, ap in direct["AP"].items():
    assert metrics[f"AP/c{label}"] == pytest.approx(ap, abs=1e-12)


def test_evaluate_batches_gathers_across_processes():
  from mdssd_jax.evaluation import loop
  predictions, ground_truths, sizes = _case_for_loop(12, num_images=20)
  direct = voc.evaluate(predictions, ground_truths, 0.5, use_07_metric=True)
  # Two "processes": interleaved images, as a strided per-process split would give, in 3 batches each.
  halves = []
  for proc in range(2):
    idx = list(range(proc, 20, 2))
    batches, _ = _to_batches([predictions[i] for i in idx], [ground_truths[i] for i in idx],
                             [sizes[i] for i in idx], batch_size=4)
    for b in batches:   # give back the global image ids
      real = b["batch_mask"]
      b["image_id"][real] = np.asarray(idx)[b["image_id"][real]]
    halves.append(batches)
  _, predict_fn = _to_batches(predictions, ground_truths, sizes, batch_size=4)
  other = [loop.batch_to_arrays(predict_fn(b), b) for b in halves[0]]
  other = {k: np.concatenate([o[k] for o in other]) for k in other[0]}

  def fake_allgather(mine):   # process 1's view: stack [process 0, process 1] on a new axis
    return {k: np.stack([other[k], v]) for k, v in mine.items()}

  ev = voc.VocMetric([f"c{i}" for i in range(1, 6)], 0.5, use_07_metric=True)
  metrics = loop.evaluate_batches(predict_fn, halves[1], ev, process_allgather=fake_allgather)
  assert ev.num_images == 20
  assert metrics["mAP"] == pytest.approx(direct["mAP"], abs=1e-12)
  # The same image twice is an error, not a silently doubled count.
  with pytest.raises(ValueError, match="more than once"):
    loop.evaluate_batches(predict_fn, halves[0], ev, process_allgather=lambda mine: {
        k: np.stack([v, v]) for k, v in mine.items()})
