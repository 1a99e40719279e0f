"""--mode=prepare on damaged official files: bad VOC annotations stop with the file and line, or are
skipped and listed; repairs (clipping, inverted corners) are counted in prepare_report.json; a
prepare killed with kill -9 leaves nothing that blocks the next one.

The VOCdevkit is written here, image by image, with one fault each; expected counts come from a
plain loop over the boxes written, not from the code under test.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from mdssd_jax.data import prepare
from mdssd_jax.data import registry
from mdssd_jax.data import report
from tests import helpers

tfds.disable_progress_bar()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(height, width, seed):
  image = np.random.default_rng(seed).integers(0, 255, size=(height, width, 3)).astype(np.uint8)
  ok, encoded = cv2.imencode(".jpg", image)
  assert ok
  return encoded.tobytes()


def _xml(width, height, objects):
  """A VOC annotation with one element per line, so that line numbers are easy to check."""
  lines = ["<annotation>", "<folder>VOC2007</folder>", "<size>", f"<width>{width}</width>",
           f"<height>{height}</height>", "<depth>3</depth>", "</size>"]
  for name, (x0, y0, x1, y1) in objects:
    lines += ["<object>", f"<name>{name}</name>", "<difficult>0</difficult>", "<bndbox>",
              f"<xmin>{x0}</xmin>", f"<ymin>{y0}</ymin>", f"<xmax>{x1}</xmax>", f"<ymax>{y1}</ymax>",
              "</bndbox>", "</object>"]
  lines.append("</annotation>")
  return "\n".join(lines).encode()


GOOD = {"000001": (60, 40, [("dog", (3, 4, 50, 38))]),
        "000002": (50, 50, [("cat", (-5, 2, 30, 60)), ("car", (30, 10, 20, 40)),   # clipped; inverted
                            ("bus", (1, 1, 10, 10))])}
MALFORMED = b"<annotation>\n<size>\n<width>60</width>\n<height>40</height>\n</size>\n<object>\n<name>dog\n</object>\n</annotation>"
MALFORMED_LINE = 8   # expat reports the mismatched </object> on line 8
_WHOLE_JPEG = _jpeg(40, 60, 99)
# Images that cannot be decoded, with a good annotation: (the JPEG's bytes, the problem named).
IMAGE_FAULTS = {"000006": (b"", "is empty (0 bytes)"),
                "000007": (_WHOLE_JPEG[:len(_WHOLE_JPEG) // 2], "the image cannot be decoded")}
FAULTS = {
    "000003": ("xml", MALFORMED, MALFORMED_LINE, "does not parse"),
    "000004": ("zero_width", _xml(0, 40, [("dog", (1, 1, 5, 5))]), 4, "0 x 40"),
    "000005": ("unicorn", _xml(60, 40, [("dog", (1, 1, 5, 5)), ("unicorn", (2, 2, 9, 9))]), 19,
               "'unicorn'"),
}


def _devkit(root, image_ids):
  base = os.path.join(root, "VOCdevkit", "VOC2007")
  for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
    os.makedirs(os.path.join(base, sub), exist_ok=True)
  for i, image_id in enumerate(image_ids):
    if image_id in GOOD:
      width, height, objects = GOOD[image_id]
      xml = _xml(width, height, objects)
    elif image_id in IMAGE_FAULTS:
      width, height, xml = 60, 40, _xml(60, 40, [("dog", (1, 1, 5, 5))])
    else:
      width, height, xml = 60, 40, FAULTS[image_id][1]
    with open(os.path.join(base, "Annotations", f"{image_id}.xml"), "wb") as f:
      f.write(xml)
    with open(os.path.join(base, "JPEGImages", f"{image_id}.jpg"), "wb") as f:
      f.write(IMAGE_FAULTS[image_id][0] if image_id in IMAGE_FAULTS
              else _jpeg(height, max(width, 1), i))
  for listing in ("train", "val", "test"):
    ids = image_ids if listing == "train" else ["000001"]
    with open(os.path.join(base, "ImageSets", "Main", f"{listing}.txt"), "w") as f:
      f.write("\n".join(ids) + "\n")
  return base


def _config(tmp_path, manual_dir, bad_annotations="error"):
  c = common.base_config()
  c.data.name = "voc/2007"
  c.data.data_dir = str(tmp_path / "tfds")
  c.data.manual_dir = manual_dir
  c.data.bad_annotations = bad_annotations
  return c


@pytest.mark.parametrize("image_id", sorted(FAULTS))
def test_bad_annotation_stops_naming_file_line_and_fix(tmp_path, image_id):
  _, _, line, problem = FAULTS[image_id]
  base = _devkit(str(tmp_path / "manual"), ["000001", image_id])
  with pytest.raises(report.BadAnnotation) as info:
    prepare.prepare(_config(tmp_path, str(tmp_path / "manual")))
  message = str(info.value)
  assert os.path.join(base, "Annotations", f"{image_id}.xml") in message
  assert f"line {line}:" in message and problem in message
  assert "Fix:" in message and "bad_annotations=skip" in message
  assert len(message) < 1000   # no JPEG bytes dumped into it


@pytest.mark.parametrize("image_id", sorted(IMAGE_FAULTS))
def test_undecodable_image_stops_naming_the_jpeg(tmp_path, image_id):
  base = _devkit(str(tmp_path / "manual"), ["000001", image_id])
  with pytest.raises(report.BadAnnotation) as info:
    prepare.prepare(_config(tmp_path, str(tmp_path / "manual")))
  message = str(info.value)
  assert os.path.join(base, "JPEGImages", f"{image_id}.jpg") in message, message
  assert IMAGE_FAULTS[image_id][1] in message and "bad_annotations=skip" in message, message


def test_prepare_through_main_skips_undecodable_images_and_leaves_no_temp_folder(tmp_path):
  """main.py --mode=prepare with bad_annotations=skip: the two images are left out, named and
  counted; TFDS's temporary folder (tmpXXXXtfds, one per prepare) is not left in the temp folder."""
  base = _devkit(str(tmp_path / "manual"), ["000001", "000006", "000007"])
  temp = tmp_path / "tmp"
  temp.mkdir()
  proc = helpers.run_main(
      ["--mode=prepare", "--config.data.name=voc/2007", f"--config.data.data_dir={tmp_path / 'tfds'}",
       f"--config.data.manual_dir={tmp_path / 'manual'}", "--config.data.bad_annotations=skip"],
      config="configs/mdssd300_voc.py", env=dict(os.environ, TMPDIR=str(temp)), check=True)
  assert "train: 2 bad annotation(s) skipped" in proc.stdout, proc.stdout
  for image_id in IMAGE_FAULTS:
    assert os.path.join(base, "JPEGImages", f"{image_id}.jpg") in proc.stderr, proc.stderr
  assert len((proc.stdout + proc.stderr).strip().splitlines()) <= 12, proc.stdout + proc.stderr
  assert not [n for n in os.listdir(temp) if n.endswith("tfds")], os.listdir(temp)
  builder = registry.get_dataset(_config(tmp_path, "").data).parts[0].make_builder(
      str(tmp_path / "tfds"))
  train = report.read(builder.data_path)["splits"]["train"]
  assert train["examples"] == 1
  assert sorted(e["file"] for e in train["skipped"]) == [
      os.path.join(base, "JPEGImages", f"{i}.jpg") for i in sorted(IMAGE_FAULTS)]


def test_unknown_policy_names_the_key(tmp_path):
  with pytest.raises(ValueError, match="config.data.bad_annotations='ignore'"):
    prepare.prepare(_config(tmp_path, str(tmp_path), bad_annotations="ignore"))


def _expected_repairs(ids):
  """Independent count: a box is clipped when a corner lies outside [0, W] x [0, H]; inverted when
  xmin > xmax or ymin > ymax."""
  clipped = inverted = 0
  for image_id in ids:
    width, height, objects = GOOD[image_id]
    for _, (x0, y0, x1, y1) in objects:
      clipped += any(v < 0 or v > width for v in (x0, x1)) or any(v < 0 or v > height for v in (y0, y1))
      inverted += x0 > x1 or y0 > y1
  return clipped, inverted


def test_skip_policy_counts_lists_and_reports(tmp_path, capsys):
  ids = ["000001", "000002", "000003", "000004", "000005"]
  base = _devkit(str(tmp_path / "manual"), ids)
  summary = prepare.prepare(_config(tmp_path, str(tmp_path / "manual"), "skip"))
  assert summary == {"mdssd_voc/2007": {"train": 2, "validation": 1, "test": 1}}
  printed = capsys.readouterr().out
  assert "train: 3 bad annotation(s) skipped" in printed and report.REPORT_FILE in printed

  info = registry.get_dataset(_config(tmp_path, "").data)
  builder = info.parts[0].make_builder(str(tmp_path / "tfds"))
  with open(os.path.join(builder.data_path, report.REPORT_FILE)) as f:
    written = json.load(f)
  train = written["splits"]["train"]
  assert written["bad_annotations"] == "skip" and train["examples"] == 2
  skipped = {entry["file"]: entry for entry in train["skipped"]}
  assert sorted(skipped) == [os.path.join(base, "Annotations", f"{i}.xml") for i in sorted(FAULTS)]
  for image_id, (_, _, line, problem) in FAULTS.items():
    entry = skipped[os.path.join(base, "Annotations", f"{image_id}.xml")]
    assert entry["line"] == line and problem in entry["problem"]
  clipped, inverted = _expected_repairs(["000001", "000002"])
  assert (train["boxes_clipped"], train["boxes_inverted"]) == (clipped, inverted) == (1, 1)
  assert train["files"]["boxes_clipped"] == [os.path.join(base, "Annotations", "000002.xml")]
  assert f"{clipped} boxes reaching outside the image" in printed
  assert written["splits"]["test"]["skipped"] == [] and written["splits"]["test"]["boxes_clipped"] == 0

  # The records themselves: the clipped box ends at the image border, the inverted one is empty.
  record = tfds.data_source("mdssd_voc/2007", split="train", data_dir=str(tmp_path / "tfds"))[1]
  bbox = np.asarray(record["objects"]["bbox"])
  np.testing.assert_allclose(bbox[0], [2 / 50, 0, 1, 30 / 50], atol=1e-6)
  assert bbox[1][3] - bbox[1][1] == 0

  # Prepared already: the summary is read back from the report.
  prepare.prepare(_config(tmp_path, str(tmp_path / "manual"), "skip"))
  assert "train: 3 bad annotation(s) skipped" in capsys.readouterr().out


# ---- kill -9 in the middle of a prepare -----------------------------------------------------------

_SLOW_PREPARE = textwrap.dedent("""
    import sys
    from configs import common
    from mdssd_jax.data import prepare
    c = common.base_config()
    c.data.name = "synthetic_small_objects"
    c.data.data_dir = {data_dir!r}
    c.data.synthetic.update(num_train=3000, num_test=8, image_size_px=64, min_object_px=6,
                            max_object_px=20, max_objects=4)
    prepare.prepare(c)
""")


def _synthetic_config(data_dir):
  c = common.base_config()
  c.data.name = "synthetic_small_objects"
  c.data.data_dir = data_dir
  c.data.synthetic.update(num_train=3000, num_test=8, image_size_px=64, min_object_px=6,
                          max_object_px=20, max_objects=4)
  return c


def test_killed_prepare_leaves_nothing_in_the_way(tmp_path):
  data_dir = str(tmp_path / "tfds")
  builder = registry.get_dataset(_synthetic_config(data_dir).data).parts[0].make_builder(data_dir)
  folder = os.fspath(builder.data_path.parent)
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE.format(data_dir=data_dir)], cwd=ROOT)
  try:
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
      if os.path.isdir(folder) and any(n.startswith("incomplete.") for n in os.listdir(folder)):
        break
      time.sleep(0.05)
    assert proc.poll() is None, "the prepare ended before it could be killed"
    time.sleep(1.0)   # well inside the generation of 3000 images
    workers = helpers.child_pids(proc.pid)
    assert workers, "3000 images are generated by a pool of worker processes"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  # The generator's pool goes with its parent (within a few watchdog periods), not minutes later.
  assert helpers.wait_gone(workers, timeout_s=10), f"workers {workers} outlived their parent"
  left = [n for n in os.listdir(folder) if n.startswith("incomplete.")]
  assert left, "a kill -9 during TFDS's generation leaves its incomplete.* folder"
  assert not builder.is_prepared()

  summary = prepare.prepare(_synthetic_config(data_dir))
  assert list(summary.values()) == [{"train": 3000, "test": 8}]
  assert not [n for n in os.listdir(folder) if n.startswith("incomplete.")]


# ---- TT100K: repairs counted, an unreadable image under both policies -----------------------------

TT_SIGNS = {  # image id: (split, [(category, (xmin, ymin, xmax, ymax))]); images are 100 x 80 px
    "1": ("train", [("pl50", (-5, 10, 20, 30)), ("p11", (90, 70, 120, 95)),
                    ("pl50", (200, 10, 220, 30)), ("ip", (5, 5, 15, 15)), ("p11", (30, 30, 50, 50))]),
    "2": ("train", [("p11", (10, 10, 20, 20))]),   # its file is not an image
    "3": ("test", [("pl50", (40, 20, 60, 40))]),
}


def _write_tt100k(root):
  imgs = {}
  for image_id, (split, signs) in TT_SIGNS.items():
    os.makedirs(os.path.join(root, split), exist_ok=True)
    data = b"not an image" if image_id == "2" else _jpeg(80, 100, int(image_id))
    with open(os.path.join(root, split, f"{image_id}.jpg"), "wb") as f:
      f.write(data)
    imgs[image_id] = {"path": f"{split}/{image_id}.jpg", "id": int(image_id), "objects": [
        {"category": c, "bbox": dict(xmin=b[0], ymin=b[1], xmax=b[2], ymax=b[3])} for c, b in signs]}
  with open(os.path.join(root, "annotations.json"), "w") as f:
    json.dump({"types": ["pl50", "p11", "ip"], "imgs": imgs}, f)


def _tt100k_config(tmp_path, root, bad_annotations):
  c = common.base_config()
  c.data.name = "tt100k"
  c.data.data_dir = str(tmp_path / "tfds")
  c.data.manual_dir = root
  c.data.tt100k.classes = ("pl50", "p11")
  c.data.bad_annotations = bad_annotations
  return c


def test_tt100k_repairs_are_counted_and_unreadable_images_follow_the_policy(tmp_path):
  root = str(tmp_path / "tt100k")
  _write_tt100k(root)
  with pytest.raises(report.BadAnnotation, match=r"train/2\.jpg: the image cannot be decoded"):
    prepare.prepare(_tt100k_config(tmp_path, root, "error"))

  c = _tt100k_config(tmp_path, root, "skip")
  assert list(prepare.prepare(c).values()) == [{"train": 1, "test": 1}]
  builder = registry.get_dataset(c.data).parts[0].make_builder(c.data.data_dir)
  train = report.read(builder.data_path)["splits"]["train"]
  # Independent count over the signs of the readable train image, 100 x 80 px.
  clipped = degenerate = other = 0
  for category, (x0, y0, x1, y1) in TT_SIGNS["1"][1]:
    if category not in ("pl50", "p11"):
      other += 1
      continue
    clipped += min(x0, y0) < 0 or max(x0, x1) > 100 or max(y0, y1) > 80
    degenerate += min(x1, 100) <= max(x0, 0) or min(y1, 80) <= max(y0, 0)
  assert (train["boxes_clipped"], train["boxes_degenerate_dropped"],
          train["objects_other_classes"]) == (clipped, degenerate, other) == (3, 1, 1)
  assert [e["file"] for e in train["skipped"]] == [os.path.join(root, "train", "2.jpg")]
  record = tfds.data_source(registry.get_dataset(c.data).parts[0].tfds_name, split="train",
                            data_dir=c.data.data_dir)[0]
  assert len(record["objects"]["label"]) == 3   # 5 signs - 1 of another class - 1 outside the image
