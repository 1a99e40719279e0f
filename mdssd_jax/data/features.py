"""The TFDS features every detection builder here shares, so the input pipeline reads them all alike.

A record is a JPEG `image`, its `image/filename`, and `objects`: a Sequence of (ymin, xmin, ymax, xmax)
normalised `bbox`es with 0-based ClassLabel `label`s. Builders add their own fields beside these.
Data already prepared stays readable: TFDS stores and serializes the fields sorted by name, so the
order in which these dicts are built does not reach the disk.
"""

import numpy as np
import tensorflow_datasets as tfds


def detection_features(class_names, extra_object_features=None, extra_features=None,
                       is_difficult=True):
  """FeaturesDict of image, image/filename and objects (bbox, label[, is_difficult]).

  Args:
    class_names: the ClassLabel names of objects/label (label i is class_names[i]).
    extra_object_features: more per-object fields, e.g. {"pose": ClassLabel(...)}.
    extra_features: more per-image fields, e.g. {"image/id": np.int64}.
    is_difficult: whether objects carry the bool `is_difficult` (COCO's don't: it has `is_crowd`).
  """
  objects = {"bbox": tfds.features.BBoxFeature(),
             "label": tfds.features.ClassLabel(names=class_names)}
  if is_difficult:
    objects["is_difficult"] = np.bool_
  objects.update(extra_object_features or {})
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "image/filename": tfds.features.Text(),
      "objects": tfds.features.Sequence(objects),
      **(extra_features or {}),
  })
