"""`python main.py --config=... --mode=prepare`: builds the config's data set in array_record format.

VOC, COCO and TT100K are built from the official files in config.data.manual_dir (default
<data_dir>/downloads/manual); the synthetic set is generated. Nothing is downloaded.
"""

import logging

from mdssd_jax.data import registry


def prepare(config):
  """Builds every part of config.data.name under config.data.data_dir (a no-op for prepared parts).

  Returns {tfds name: {split: number of examples}}; raises FileNotFoundError naming the exact files
  and the folder they belong in when the official files are missing.
  """
  data_cfg = config.data
  info = registry.get_dataset(data_cfg)
  manual_dir = data_cfg.manual_dir or registry.default_manual_dir(data_cfg.data_dir)
  missing = [m for m in (part.missing_files(manual_dir) for part in info.parts
                         if not part.make_builder(data_cfg.data_dir).is_prepared()) if m]
  if missing:
    raise FileNotFoundError("\n\n".join(missing))
  summary = {}
  for part in info.parts:
    builder = registry.prepare_part(part, data_cfg.data_dir, manual_dir)
    summary[part.tfds_name] = {name: split.num_examples for name, split in builder.info.splits.items()}
    lines = ", ".join(f"{name} {count}" for name, count in sorted(summary[part.tfds_name].items()))
    message = f"{info.name}: {part.tfds_name} ready in {builder.data_path} ({lines})"
    logging.info(message)
    print(message, flush=True)
  return summary
