"""`python -m cv_env.tasks export | preview | list`."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from cv_env.tasks import read_parquet
from cv_env.tasks.__main__ import main


def test_export_writes_a_readable_parquet(tmp_path, capsys):
    out = tmp_path / "test.parquet"
    assert main(["export", "--suite", "default", "--split", "test", "--n", "6", "--out", str(out)]) == 0
    assert "wrote 6 tasks" in capsys.readouterr().out
    src = read_parquet(out)
    assert len(src) == 6 and all(t.id.startswith("synthetic/test/0/") for t in src)


def test_export_with_robustness_variants(tmp_path):
    out = tmp_path / "robust.parquet"
    assert main(["export", "--suite", "charts", "--n", "2", "--robustness", "--out", str(out)]) == 0
    variants = [t.extra["robustness"]["variant"] for t in read_parquet(out)]
    assert variants == ["original", "rotate_90", "rotate_180", "rotate_270", "flip_horizontal", "flip_vertical"] * 2


def test_preview_draws_a_contact_sheet(tmp_path):
    out = tmp_path / "preview.png"
    assert main(["preview", "--n", "6", "--cols", "3", "--out", str(out)]) == 0
    sheet = Image.open(out)
    assert sheet.size == (3 * 310 + 10, 2 * 460 + 10)


def test_module_entry_point_lists_categories():
    result = subprocess.run([sys.executable, "-m", "cv_env.tasks", "list"], capture_output=True, text=True, check=True)
    assert "glyph_orientation" in result.stdout and "tiny_ocr" in result.stdout
