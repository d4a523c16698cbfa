"""A fresh install: the calibration folder exists from pack load, empty loaders say how to fill
them (the frontend shows "undefined" for an empty list), every output explains itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import NODE_IDS, Comfy


def _combo(comfy: Comfy, node_id: str, name: str) -> list[str]:
    spec = comfy.node(node_id).INPUT_TYPES()["required"][name]
    return list(spec[0]) if isinstance(spec[0], list) else list(spec[1]["options"])


def test_calibration_folder_is_created_and_registered_at_pack_load(comfy: Comfy) -> None:
    import folder_paths

    # the conftest put diffusion_models in its base folder before loading the pack
    expected = comfy.base / "models" / "ditprune_calibrations"
    assert expected.is_dir()
    assert [Path(p) for p in folder_paths.get_folder_paths("ditprune_calibrations")] == [expected]


@pytest.fixture
def empty_folders(comfy: Comfy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    import folder_paths

    folders = {}
    for name, exts in (("ditprune_calibrations", {".safetensors"}), ("diffusion_models", {".safetensors"})):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(folder)], exts))
        folder_paths.filename_list_cache.pop(name, None)
        folders[name] = folder
    yield folders
    for name in folders:
        folder_paths.filename_list_cache.pop(name, None)


def test_empty_loaders_offer_a_placeholder_that_explains(comfy: Comfy, empty_folders: dict[str, Any]) -> None:
    import folder_paths

    assert _combo(comfy, "DitPruneLoadCalibration", "calibration_name") == [
        "(none yet: set save_name on DiT-Pruning Calibrate to save one)"
    ]
    (placeholder,) = _combo(comfy, "DitPruneLoadPrunedModel", "model_name")
    assert "Save Pruned Model" in placeholder
    with pytest.raises(ValueError, match=r"no file in .*ditprune_calibrations yet: set save_name") as err:
        comfy.node("DitPruneLoadCalibration").execute(
            calibration_name=_combo(comfy, "DitPruneLoadCalibration", "calibration_name")[0]
        )
    assert str(err.value).count("yet") == 1, err.value  # once: not "...yet: none yet: set save_name..."
    with pytest.raises(ValueError, match=r"no file in .*diffusion_models yet"):
        comfy.node("DitPruneLoadPrunedModel").execute(model_name=placeholder)
    # once a file is there, the list shows it and the placeholder is gone
    (empty_folders["ditprune_calibrations"] / "fox.safetensors").write_bytes(b"")
    folder_paths.filename_list_cache.pop("ditprune_calibrations", None)
    assert _combo(comfy, "DitPruneLoadCalibration", "calibration_name") == ["fox.safetensors"]


def test_every_output_has_a_tooltip_and_every_node_a_description(comfy: Comfy) -> None:
    for node_id in NODE_IDS:
        schema = comfy.node(node_id).define_schema()
        assert schema.description, f"{node_id} has no description"
        for out in schema.outputs:
            assert out.tooltip and len(out.tooltip) > 10, (
                f"{node_id} output {out.display_name} has no tooltip"
            )
    text_outputs = [
        (node_id, out.display_name)
        for node_id in NODE_IDS
        for out in comfy.node(node_id).define_schema().outputs
        if out.get_io_type() == "STRING"
    ]
    assert len(text_outputs) == 9  # Save has two: path and size; Load Calibration its record
    for node_id, name in text_outputs:
        tooltip = next(
            o.tooltip for o in comfy.node(node_id).define_schema().outputs if o.display_name == name
        )
        assert "Preview Any" in tooltip, (node_id, name)
