"""The quick-start notebook runs top to bottom (tiny setting) and shows what it promises."""

import json
import os

import cv2
import nbclient
import nbformat

from tests.conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "colabs", "mdssd_quickstart.ipynb")
CELL_TIMEOUT_S = 600

# Independent figures the structure section must print. SSD300 (VOC, 21 outputs per box) has
# 26,285,486 parameters in the reference PyTorch port (ssd.pytorch, L2Norm included); its default
# boxes are 38^2*4 + 19^2*6 + 10^2*6 + 5^2*6 + 3^2*4 + 1*4 = 8732, and MDSSD300 adds a 75x75 map with
# 4 boxes per cell: 8732 + 22500 = 31232 (its 38x38 head has ratios {2}: 5776 instead of SSD's 8664,
# so 22500 + 5776 + 2166 + 600 + 150 + 36 + 4). The Fusion Blocks' deconvolutions, walked by hand with
# out = 2 * in - 1 (kernel 3, padding 1) or 2 * in (kernel 2): 10 -3-> 19 -2-> 38 -3-> 75,
# 5 -2-> 10 -3-> 19 -2-> 38, 3 -3-> 5 -2-> 10 -3-> 19.
EXPECTED_TEXT = ["26,285,486", "8,732", "31,232", "kernels (3, 2, 3)", "kernels (2, 3, 2)",
                 "conv8_2 10 -k3-> 19 -k2-> 38 -k3-> 75", "conv9_2 5 -k2-> 10 -k3-> 19 -k2-> 38",
                 "conv10_2 3 -k3-> 5 -k2-> 10 -k3-> 19"]


def _text_of(cell):
  parts = []
  for out in cell.get("outputs", []):
    if out.get("output_type") == "stream":
      parts.append(out["text"])
    elif "data" in out:
      parts.append(out["data"].get("text/plain", ""))
  return "".join(parts)


def _images_of(cell):
  return [out for out in cell.get("outputs", []) if "data" in out and "image/png" in out["data"]]


def test_committed_notebook_is_valid_and_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.outputs == [] and c.execution_count is None for c in code)
  # Every code cell is introduced by an explanation.
  assert nb.cells[0].cell_type == "markdown"
  assert sum(c.cell_type == "markdown" for c in nb.cells) >= 7


def test_notebook_runs_top_to_bottom_in_tiny_mode(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  monkeypatch.setenv("MDSSD_QUICKSTART_TINY", "1")
  monkeypatch.setenv("MDSSD_QUICKSTART_WORKDIR", str(workdir))
  monkeypatch.setenv("MDSSD_QUICKSTART_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.delenv("MDSSD_QUICKSTART_STEPS", raising=False)
  monkeypatch.delenv("MDSSD_QUICKSTART_EVAL_EVERY", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel inherits this process's environment (the settings above and conftest's XLA cache).
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": ROOT}})
  client.execute()   # raises CellExecutionError naming the cell if any cell fails

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"]
  text = "\n".join(_text_of(c) for c in code)
  assert "tiny smoke-test run: 6 steps, evaluation every 3" in text
  for expected in EXPECTED_TEXT:
    assert expected in text, f"the structure section did not print {expected!r}"

  # Training: evaluations at steps 3 and 6 (the evaluation cell must not append a line), pictures
  # of both evaluations and the final checkpoint.
  results = [json.loads(line) for line in open(workdir / "eval_results.jsonl")]
  assert [r["step"] for r in results] == [3, 6]
  assert all(0.0 <= r["mAP"] <= 1.0 for r in results)
  assert sorted(os.listdir(workdir / "pictures")) == ["step_00000003", "step_00000006"]
  assert "6" in os.listdir(workdir / "checkpoints")
  assert "checkpoint of step 6: mAP" in text

  # Figures: the curves (2 panels) and one row per test picture, each shown and saved.
  curves = cv2.imread(str(workdir / "quickstart_curves.png"))
  pictures = cv2.imread(str(workdir / "quickstart_detections.png"))
  assert curves is not None and curves.shape[1] > curves.shape[0]
  assert pictures is not None and pictures.shape[0] > pictures.shape[1]   # 4 rows stacked
  assert sum(bool(_images_of(c)) for c in code) == 2
