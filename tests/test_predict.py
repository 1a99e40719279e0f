"""Tiled inference, predict_images and pictures, with a fake detector written here in NumPy/OpenCV.

The fake detector "sees" bright squares: it reports the bounding box of each bright blob in its
input that is at least MIN_SIDE_PX wide and high, as class 1 with score 0.9.
"""

import json
import os

import cv2
import ml_collections
import numpy as np
import pytest

from mdssd_jax.run import predict as run_predict
from mdssd_jax.inference import predictor as predict
from mdssd_jax.report import visualize

MIN_SIDE_PX = 6
SLOTS = 8


def fake_detector(images):
  """(N, S, S, 3) uint8 -> normalised detections (N, SLOTS, ...) as postprocess.detect returns."""
  n, size = images.shape[0], images.shape[1]
  boxes = np.zeros((n, SLOTS, 4), np.float32)
  scores = np.zeros((n, SLOTS), np.float32)
  classes = np.zeros((n, SLOTS), np.int32)
  valid = np.zeros((n, SLOTS), bool)
  for i in range(n):
    mask = (images[i].max(axis=-1) > 200).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    k = 0
    for x, y, w, h, _ in stats[1:]:          # component 0 is the background
      if w >= MIN_SIDE_PX and h >= MIN_SIDE_PX and k < SLOTS:
        boxes[i, k] = np.array([x, y, x + w, y + h], np.float32) / size
        scores[i, k], classes[i, k], valid[i, k] = 0.9, 1, True
        k += 1
  return dict(boxes=boxes, scores=scores, classes=classes, valid=valid)


def _image_with_squares(height, width, squares):
  image = np.zeros((height, width, 3), np.uint8)
  for x, y, side in squares:
    image[y:y + side, x:x + side] = 255
  return image


def test_tile_origins_cover_the_image():
  assert predict.tile_origins(2048, 512, 64) == [0, 448, 896, 1344, 1536]
  assert predict.tile_origins(300, 300, 64) == [0]
  assert predict.tile_origins(200, 300, 64) == [0]
  with pytest.raises(ValueError, match="overlap"):
    predict.tile_origins(1000, 300, 300)


def test_tiled_finds_small_object_that_whole_image_misses():
  image = _image_with_squares(2048, 2048, [(1000, 700, 12)])
  whole = predict.whole_image_detect(fake_detector, [image], input_size_px=300, batch_size=2)[0]
  assert len(whole["scores"]) == 0                     # 12 px -> under 2 px at 300: missed
  tiled = predict.tiled_detect(fake_detector, image, tile_size_px=300, overlap_px=64, nms_iou=0.45,
                               top_k=100, batch_size=16)
  assert len(tiled["scores"]) == 1
  np.testing.assert_allclose(tiled["boxes_px"][0], [1000, 700, 1012, 712], atol=1e-3)
  assert tiled["classes"][0] == 1 and tiled["scores"][0] == pytest.approx(0.9)


def test_overlapping_tiles_merge_into_one_box():
  # Width 600, tiles of 300 with overlap 100 start at 0, 200, 300. A square at x 250..270 lies in
  # tiles 0 and 200: two detections, one box after NMS.
  image = _image_with_squares(300, 600, [(250, 100, 20)])
  out = predict.tiled_detect(fake_detector, image, 300, 100, 0.45, 100, 4)
  assert len(out["scores"]) == 1
  np.testing.assert_allclose(out["boxes_px"][0], [250, 100, 270, 120], atol=1e-3)


def test_boxes_cut_by_a_tile_border_are_dropped():
  # A 30 px square at x 290..320 is cut by tile 0's right border (290..300) and tile 300's left
  # border (300..320); tile 200 sees it whole. The 10 px piece overlaps the whole box by 1/3 < 0.45,
  # so NMS alone keeps it as a second box; dropping boxes cut by inner borders leaves the whole one.
  image = _image_with_squares(300, 600, [(290, 100, 30)])
  kept_all = predict.tiled_detect(fake_detector, image, 300, 100, 0.45, 100, 4, drop_cut_boxes=False)
  assert sorted(map(tuple, kept_all["boxes_px"].tolist())) == [(290, 100, 300, 130), (290, 100, 320, 130)]
  out = predict.tiled_detect(fake_detector, image, 300, 100, 0.45, 100, 4)
  assert len(out["scores"]) == 1
  np.testing.assert_allclose(out["boxes_px"][0], [290, 100, 320, 130], atol=1e-3)
  # A square on the image border is not "cut": it stays.
  border = _image_with_squares(300, 600, [(0, 0, 20), (580, 280, 20)])
  out = predict.tiled_detect(fake_detector, border, 300, 100, 0.45, 100, 4)
  assert len(out["scores"]) == 2


def test_small_image_is_padded_to_one_tile():
  image = _image_with_squares(120, 200, [(150, 50, 10)])
  out = predict.tiled_detect(fake_detector, image, 300, 64, 0.45, 100, 2)
  np.testing.assert_allclose(out["boxes_px"], [[150, 50, 160, 60]], atol=1e-3)


def test_class_wise_nms_keeps_other_classes_and_top_k():
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], np.float32)
  scores = np.array([0.5, 0.9, 0.8, 0.7], np.float32)
  classes = np.array([1, 2, 1, 1])
  keep = predict.class_wise_nms(boxes, scores, classes, 0.45, top_k=10)
  assert keep.tolist() == [1, 2, 3]      # box 0 suppressed by box 2 (same class), box 1 other class
  assert predict.class_wise_nms(boxes, scores, classes, 0.45, top_k=2).tolist() == [1, 2]


def test_predict_images_writes_json_and_pictures(tmp_path, caplog):
  src = tmp_path / "images"
  src.mkdir()
  cv2.imwrite(str(src / "a.png"), _image_with_squares(96, 128, [(20, 30, 40)]))
  cv2.imwrite(str(src / "b.png"), _image_with_squares(64, 64, [(5, 5, 20), (40, 40, 16)]))
  (src / "broken.jpg").write_bytes(b"not an image")
  out_dir = tmp_path / "out"
  summary = run_predict.predict_images(fake_detector, [str(src)], ["sign"], str(out_dir),
                                   input_size_px=64, score_threshold=0.5, batch_size=4,
                                   picture_format="png")
  assert summary["skipped"] == [str(src / "broken.jpg")]
  assert "broken.jpg" in caplog.text
  assert summary["num_images"] == 2 and summary["num_detections"] == 3
  results = json.load(open(summary["json_path"]))
  by_file = {}
  for r in results:
    by_file.setdefault(os.path.basename(r["file_name"]), []).append(r)
  (a,) = by_file["a.png"]
  assert a["category_id"] == 1 and a["category_name"] == "sign" and a["score"] == pytest.approx(0.9)
  # a.png (128x96) is warped to 64x64: the box comes back to within a couple of pixels.
  np.testing.assert_allclose(a["bbox"], [20, 30, 40, 40], atol=2.5)
  assert sorted(tuple(r["bbox"]) for r in by_file["b.png"]) == [(5, 5, 20, 20), (40, 40, 16, 16)]
  assert {r["image_id"] for r in by_file["a.png"]} != {r["image_id"] for r in by_file["b.png"]}
  for path in summary["picture_paths"]:
    assert os.path.isfile(path)
  picture = cv2.cvtColor(cv2.imread(os.path.join(out_dir, "a.png")), cv2.COLOR_BGR2RGB)
  assert picture.shape == (96, 128, 3)
  # The box outline (about x = 20) is drawn in class 1's colour on the black background.
  row = picture[50, 15:26].astype(int)
  assert any(tuple(px) == visualize.class_color(1) for px in row)


def test_predict_images_tiled_and_errors(tmp_path):
  path = tmp_path / "big.png"
  cv2.imwrite(str(path), _image_with_squares(700, 900, [(610, 400, 12)]))
  tiled_cfg = ml_collections.ConfigDict(dict(enabled=True, overlap_px=64))
  summary = run_predict.predict_images(fake_detector, [str(tmp_path / "*.png")], ["sign"],
                                   str(tmp_path / "out"), input_size_px=256, tiled_cfg=tiled_cfg,
                                   batch_size=8)
  (r,) = json.load(open(summary["json_path"]))
  np.testing.assert_allclose(r["bbox"], [610, 400, 12, 12], atol=1e-2)
  with pytest.raises(ValueError, match="no image files match"):
    run_predict.predict_images(fake_detector, [str(tmp_path / "*.gif")], ["sign"], str(tmp_path / "o2"), 256)
  (tmp_path / "bad.jpg").write_bytes(b"xx")
  with pytest.raises(ValueError, match="could be read"):
    run_predict.predict_images(fake_detector, [str(tmp_path / "bad.jpg")], ["sign"], str(tmp_path / "o3"), 256)


def test_draw_and_side_by_side():
  image = np.zeros((100, 200, 3), np.uint8)
  drawn = visualize.draw_detections(image, np.array([[10, 10, 60, 80]]), np.array([3]),
                                    np.array([0.87]), ["a", "b", "c"])
  assert drawn.shape == image.shape and image.max() == 0 and drawn.max() > 0
  assert tuple(drawn[50, 10]) == visualize.class_color(3)
  assert visualize.class_color(1) != visualize.class_color(2)
  gt = visualize.draw_detections(np.zeros((50, 60, 3), np.uint8), np.zeros((0, 4)), np.zeros(0, int),
                                 None, ["a"])
  both = visualize.side_by_side(drawn, gt, gap_px=4)
  assert both.shape == (100, 200 + 4 + 120, 3)
