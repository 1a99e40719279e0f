"""`python main.py --config=... --mode=prepare`: builds the config's data set in array_record format.

VOC, COCO and TT100K are built from the official files in config.data.manual_dir (default
<data_dir>/downloads/manual); the synthetic set is generated. Nothing is downloaded.
"""

import os

from mdssd_jax.data import registry
from mdssd_jax.data import report


def prepare(config):
  """Builds every part of config.data.name under config.data.data_dir (a no-op for prepared parts).

  Returns {tfds name: {split: number of examples}}; raises FileNotFoundError naming the exact files
  and the folder they belong in when the official files are missing, and report.BadAnnotation
  naming the file and line of the first annotation that cannot be read unless
  config.data.bad_annotations="skip". Prints where each part is and what preparing it repaired or
  skipped (report.REPORT_FILE in the part's folder).
  """
  data_cfg = config.data
  bad_annotations = report.check_policy(data_cfg.get("bad_annotations", "error"))
  info = registry.get_dataset(data_cfg)
  if info.describe:
    print(info.describe, flush=True)   # the first line: what is read, in which format
  manual_dir = data_cfg.manual_dir or registry.default_manual_dir(data_cfg.data_dir)
  missing = [m for m in (part.missing_files(manual_dir) for part in info.parts
                         if not part.make_builder(data_cfg.data_dir).is_prepared()) if m]
  if missing:
    raise FileNotFoundError("\n\n".join(missing))
  summary = {}
  for part in info.parts:
    builder = registry.prepare_part(part, data_cfg.data_dir, manual_dir, bad_annotations)
    summary[part.tfds_name] = {name: split.num_examples for name, split in builder.info.splits.items()}
    lines = ", ".join(f"{name} {count}" for name, count in sorted(summary[part.tfds_name].items()))
    message = f"{info.name}: {part.tfds_name} ready in {builder.data_path} ({lines})"
    part_report = report.read(builder.data_path)
    if part_report is not None:
      details = report.summary(part_report)
      message += (f"\n{details}\n  (details in {os.path.join(builder.data_path, report.REPORT_FILE)})"
                  if details else "; nothing repaired or skipped")
    # On stdout, where main.py's console writes the run's other lines (flushed: in order).
    print(message, flush=True)
  return summary
