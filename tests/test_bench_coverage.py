"""The coverage benchmark's pieces by hand (its figures come from ``python -m bench coverage``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.coverage import CoverageRow, calibration_labels, write_coverage


def test_labels_cycle_through_the_classes() -> None:
    assert calibration_labels([3], 4).tolist() == [3, 3, 3, 3]
    assert calibration_labels([0, 1, 2, 3, 4], 8).tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert torch.bincount(calibration_labels([5, 6], 32)).tolist()[5:] == [16, 16]
    with pytest.raises(ValueError, match="cannot cover"):
        calibration_labels([0, 1, 2, 3, 4], 4)
    with pytest.raises(ValueError, match="cannot cover"):
        calibration_labels([], 8)


def test_table_and_curve(tmp_path: Path) -> None:
    rows = [
        CoverageRow("m", 1, 8, [0.001, 0.003], [0.004, 0.008], [1.0, 1.0]),
        CoverageRow("m", 1, 32, [0.001], [0.002], [1.0]),
        CoverageRow("m", 5, 8, [0.002], [0.002], [2.0]),
    ]
    md, png = write_coverage(rows, tmp_path, "cmd")
    text = md.read_text()
    # means over the splits: seen 0.002, held 0.006, ratio 3.00
    assert "| m | 1 | 8 | 0.00200 | 0.00600 | 3.00 | 1 |" in text
    assert "| m | 5 | 8 | 0.00200 | 0.00200 | 1.00 | 2 |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
