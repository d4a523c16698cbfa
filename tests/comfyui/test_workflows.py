"""The example workflows against the live node schemas: types exist, links fit, widget counts fit."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Comfy

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def all_nodes(comfy: Comfy) -> dict[str, Any]:
    if "FluxGuidance" not in comfy.mappings:  # comfy_extras nodes, as the server loads them
        asyncio.run(comfy.nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return comfy.mappings


def _inputs(cls: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    spec = cls.INPUT_TYPES()
    out = {}
    for group in ("required", "optional"):
        for name, value in spec.get(group, {}).items():
            kind = value[0] if isinstance(value[0], str) else "COMBO"
            out[name] = (str(kind), value[1] if len(value) > 1 else {})
    return out


def test_there_are_workflows_for_flux_and_sd35() -> None:
    assert {p.name for p in WORKFLOWS} == {
        "ditprune_flux1_dev.json",
        "ditprune_sd35.json",
        "ditprune_wan21_t2v.json",
    }


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_fits_live_schemas(path: Path, all_nodes: dict[str, Any]) -> None:
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in nodes.values():
        assert node["type"] in all_nodes, f"{path.name}: unknown node type {node['type']}"
        live = _inputs(all_nodes[node["type"]])
        widgets = [name for name, (kind, _) in live.items() if kind in WIDGET_TYPES]
        # the web UI adds a "control after generate" value after such INTs (and after any named seed)
        extra = sum(
            1
            for name in widgets
            if live[name][1].get("control_after_generate")
            or (live[name][0] == "INT" and name in ("seed", "noise_seed"))
        )
        assert len(node["widgets_values"]) == len(widgets) + extra, (
            f"{path.name}: node {node['id']} {node['type']} has {len(node['widgets_values'])} widget values, "
            f"the live schema {len(widgets)} widgets (+{extra} seed controls): {widgets}"
        )
        for inp in node["inputs"]:
            assert inp["name"] in live, f"{node['type']} has no input {inp['name']}"
            assert live[inp["name"]][0] == inp["type"], (
                f"{node['type']}.{inp['name']} is {live[inp['name']][0]}"
            )
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        source, target = nodes[src], nodes[dst]
        returns = [str(t) for t in all_nodes[source["type"]].RETURN_TYPES]
        assert returns[src_slot] == kind, (
            f"link {link_id}: {source['type']} output {src_slot} is {returns[src_slot]}"
        )
        target_input = target["inputs"][dst_slot]
        assert target_input["type"] == kind and target_input["link"] == link_id, (
            f"link {link_id} into {target['type']}"
        )
    # every required socket is connected
    for node in nodes.values():
        required = all_nodes[node["type"]].INPUT_TYPES().get("required", {})
        sockets = {
            name
            for name, (kind, _) in _inputs(all_nodes[node["type"]]).items()
            if kind not in WIDGET_TYPES and name in required
        }
        connected = {inp["name"] for inp in node["inputs"] if inp["link"] is not None}
        assert sockets <= connected, f"{path.name}: {node['type']} leaves {sockets - connected} unconnected"
