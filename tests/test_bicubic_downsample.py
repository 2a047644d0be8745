"""Tests of scripts/bicubic_downsample.py."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from deflow_synth._basicsr import imresize

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bicubic_downsample.py"


def test_folder_is_downsampled_with_matlab_bicubic(tmp_path):
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (42, 37, 3), dtype=np.uint8)
    (tmp_path / "hr" / "sub").mkdir(parents=True)
    Image.fromarray(photo).save(tmp_path / "hr" / "sub" / "a.png")
    (tmp_path / "hr" / "broken.png").write_bytes(b"broken")

    command = [sys.executable, str(SCRIPT), str(tmp_path / "hr"), str(tmp_path / "lr")]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)

    assert result.returncode == 1 and "broken.png" in result.stderr
    small = np.asarray(Image.open(tmp_path / "lr" / "sub" / "a.png"))
    expected = imresize(photo[:40, :36].astype(np.float64) / 255, 1 / 4)
    assert small.shape == (10, 9, 3)
    np.testing.assert_array_equal(small, np.round(np.clip(expected, 0, 1) * 255))
