"""Writes records of a prepared data set out as a labelling tool would: COCO JSON, YOLO or VOC files.

The tests of `config.data.name = "custom"` (tests/test_custom_data.py) write the generated demo set in
each format with these writers, prepare it, and compare the records with the native builder's. The
writers follow each format's published layout, not the project's reader: COCO's [x, y, w, h] in
pixels with arbitrary category ids, ultralytics' `class cx cy w h` normalised lines beside
images/, VOC's integer pixel corners in Annotations/*.xml.
"""

import json
import os
from typing import Dict, List, Sequence

import cv2
import numpy as np


def records_of(source) -> List[Dict]:
  """[{file_name, image (encoded bytes), boxes_xyxy (N, 4) normalised, labels (N,) 0-based}]."""
  out = []
  for i in range(len(source)):
    record = source[i]
    bbox = np.asarray(record["objects"]["bbox"], np.float64).reshape(-1, 4)
    name = record["image/filename"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    out.append({"file_name": name, "image": bytes(record["image"]),
                "boxes_xyxy": bbox[:, [1, 0, 3, 2]],
                "labels": np.asarray(record["objects"]["label"], np.int64).reshape(-1)})
  return out


def _size(image_bytes):
  image = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_COLOR)
  return image.shape[1], image.shape[0]


def write_coco(records, class_names: Sequence[str], json_path: str, image_dir: str,
               category_ids: Sequence[int], subfolder: str = "") -> None:
  """COCO JSON at json_path, images in image_dir[/subfolder]; class k gets category_ids[k]."""
  os.makedirs(os.path.join(image_dir, subfolder), exist_ok=True)
  images, annotations = [], []
  for i, r in enumerate(records):
    file_name = os.path.join(subfolder, f"img_{i:04d}.jpg") if subfolder else f"img_{i:04d}.jpg"
    with open(os.path.join(image_dir, file_name), "wb") as f:
      f.write(r["image"])
    width, height = _size(r["image"])
    image_id = 1000 + 7 * i          # ids that are neither contiguous nor positions
    images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    for box, label in zip(r["boxes_xyxy"], r["labels"]):
      x0, y0, x1, y1 = box * [width, height, width, height]
      annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                          "category_id": int(category_ids[label]),
                          "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                          "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0})
  categories = [{"id": int(cid), "name": name} for cid, name in zip(category_ids, class_names)]
  os.makedirs(os.path.dirname(json_path), exist_ok=True)
  with open(json_path, "w") as f:
    json.dump({"images": images, "annotations": annotations, "categories": categories[::-1]}, f)


def write_yolo(splits: Dict[str, list], class_names: Sequence[str], root: str,
               names_as_dict: bool = False) -> str:
  """An ultralytics layout under root (images/<split>/, labels/<split>/, data.yaml); its yaml path."""
  for split, records in splits.items():
    os.makedirs(os.path.join(root, "images", split), exist_ok=True)
    os.makedirs(os.path.join(root, "labels", split), exist_ok=True)
    for i, r in enumerate(records):
      stem = f"img_{i:04d}"
      with open(os.path.join(root, "images", split, stem + ".jpg"), "wb") as f:
        f.write(r["image"])
      if not len(r["labels"]) and i % 2:   # ultralytics: no label file = no objects
        continue
      with open(os.path.join(root, "labels", split, stem + ".txt"), "w") as f:
        for (x0, y0, x1, y1), label in zip(r["boxes_xyxy"], r["labels"]):
          f.write(f"{label} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}\n")
  names = ({k: n for k, n in enumerate(class_names)} if names_as_dict else list(class_names))
  lines = [f"path: {root}", "train: images/train"]
  if "val" in splits:
    lines.append("val: images/val")
  lines.append("names: " + json.dumps(names if not names_as_dict else {str(k): v for k, v in names.items()}))
  path = os.path.join(root, "data.yaml")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def voc_xml(file_name, width, height, objects) -> str:
  """A VOC annotation: objects [(name, xmin, ymin, xmax, ymax)] in integer pixels."""
  parts = [f"<annotation><filename>{file_name}</filename>",
           f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
  for name, x0, y0, x1, y1 in objects:
    parts.append(f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin>"
                 f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
  return "\n".join(parts) + "\n</annotation>\n"


def write_voc(splits: Dict[str, list], class_names: Sequence[str], root: str) -> None:
  """A VOC folder: Annotations/, JPEGImages/, ImageSets/Main/<split>.txt (ids unique over splits)."""
  for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  for split, records in splits.items():
    ids = []
    for i, r in enumerate(records):
      image_id = f"{split}_{i:04d}"
      ids.append(image_id)
      with open(os.path.join(root, "JPEGImages", image_id + ".jpg"), "wb") as f:
        f.write(r["image"])
      width, height = _size(r["image"])
      objects = [(class_names[label], *(int(round(v)) for v in box * [width, height, width, height]))
                 for box, label in zip(r["boxes_xyxy"], r["labels"])]
      with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
        f.write(voc_xml(image_id + ".jpg", width, height, objects))
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
      f.write("\n".join(ids) + "\n")
