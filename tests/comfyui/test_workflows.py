"""The example workflows against the live node schemas: types exist, links fit, widget counts fit."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import runpy
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Comfy

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the frontend, no backend node
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


def _generator() -> dict[str, Any]:
    return runpy.run_path(str(REPO / "workflows" / "make_workflows.py"), run_name="ditprune_workflows")


def test_there_are_workflows_for_flux_and_sd35() -> None:
    assert {p.name for p in WORKFLOWS} == {
        "ditprune_flux1_dev.json",
        "ditprune_sd35.json",
        "ditprune_wan21_t2v.json",
        "ditprune_flux1_dev_reconstruct.json",
        "ditprune_sd35_reconstruct.json",
        *TIER_WORKFLOWS,
    }
    assert {
        "ditprune_flux1_dev_6gb.json",
        "ditprune_flux1_dev_8gb.json",
        "ditprune_flux1_dev_12gb.json",
    } == TIER_WORKFLOWS


def test_per_gpu_workflows_carry_the_size_fidelity_tables_choice() -> None:
    """Each per-GPU workflow's Prune and Reconstruct and Save widgets are the setting the chooser
    picks from docs/bench/frontier.json for its card (not copied by hand): the size target that
    picks it, the three widgets it replaces showing it, Save taking values and remainder from it; its
    note says what that costs and gives, in the table's figures."""
    from ditprune_core.config import UPGRADE_CHOICES
    from ditprune_core.tiers import choose_tier

    assert _generator()["UPGRADE_CHOICES"] == UPGRADE_CHOICES  # the generator's copy (it imports no torch)

    table = json.loads((REPO / "docs" / "bench" / "frontier.json").read_text())
    for name in TIER_WORKFLOWS:
        gib = int(name.removeprefix("ditprune_flux1_dev_").removesuffix("gb.json"))
        choice = choose_tier(table, gib)
        assert choice.verdict == "ditprune"
        workflow = _load(REPO / "workflows" / name)
        (recon,) = [n for n in workflow["nodes"] if n["type"] == "DitPrunePruneAndReconstruct"]
        (save,) = [n for n in workflow["nodes"] if n["type"] == "DitPruneSavePrunedModel"]
        sparsity, pattern, value_bits = (
            recon["widgets_values"][8],
            recon["widgets_values"][9],
            recon["widgets_values"][16],
        )
        assert (sparsity, pattern) == (choice.sparsity, choice.pattern), name
        assert value_bits == ("none" if choice.value_bits is None else str(choice.value_bits)), name
        assert recon["widgets_values"][17:20] == [0, choice.target_file_gb, str(choice.value_group)], name
        assert save["widgets_values"][1:] == ["compressed", "size target", "auto", "size target"], name
        note = next(
            n["widgets_values"][0]
            for n in workflow["nodes"]
            if n.get("title") == "About: prune and reconstruct"
        )
        assert note.startswith(f"For {gib} GB GPUs"), note
        for figure in (
            f"target_file_gb {choice.target_file_gb} picks "
            + (f"{choice.sparsity:.0%} sparsity" if choice.sparsity else "no pruning (quantise only)"),
            f"File {choice.file_gb:.2f} GB",
            f"VRAM {choice.vram_gb:.2f} GB",
            f"remainder {choice.remainder}",
            *(f"{e:.4f}" for e in choice.errors.values()),
        ):
            assert figure in note, (name, figure)


def test_committed_workflows_are_what_the_generator_writes() -> None:
    """Every JSON in workflows/ is make_workflows.py's output (regenerate: --force)."""
    built = _generator()["WORKFLOWS"]
    assert set(built) == {p.name for p in WORKFLOWS}
    for path in WORKFLOWS:
        assert json.loads(path.read_text()) == built[path.name](), f"{path.name}: rerun make_workflows.py"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_fits_live_schemas(path: Path, all_nodes: dict[str, Any]) -> None:
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY}
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
        assert target_input["type"] in (kind, "*") and target_input["link"] == link_id, (
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


# --- what a user sees: text results, model files, layout ------------------------------------------

TITLE, SLOT = 30, 20  # litegraph: title bar above a node's pos; slot pitch
# the image workflows share one graph; checks of its exact contents apply to them, the rest to all
IMAGE_WORKFLOWS = {"ditprune_flux1_dev.json", "ditprune_sd35.json"}
# the per-GPU FLUX.1-dev workflows, one per tier of docs/bench/vram_tiers.json that ditprune serves
TIER_WORKFLOWS = {
    f"ditprune_flux1_dev_{t['vram_gib']}gb.json"
    for t in json.loads((REPO / "docs" / "bench" / "vram_tiers.json").read_text())["tiers"]
    if t["verdict"] == "ditprune"
}
# the reconstruction variants: the same loaders, then Prune and Reconstruct
RECONSTRUCT_WORKFLOWS = {
    "ditprune_flux1_dev_reconstruct.json",
    "ditprune_sd35_reconstruct.json",
    *TIER_WORKFLOWS,
}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _box(node: dict[str, Any]) -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 of a node on the canvas, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE, x + w, y + h


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_text_output_is_shown_by_preview_any(path: Path, all_nodes: dict[str, Any]) -> None:
    workflow = _load(path)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {lk[0]: lk for lk in workflow["links"]}
    shown = []
    for node in nodes.values():
        if node["type"] in FRONTEND_ONLY:
            continue
        for out in node["outputs"]:
            if out["type"] != "STRING":
                continue
            targets = [nodes[links[lid][3]]["type"] for lid in out["links"]]
            assert "PreviewAny" in targets, f"{path.name}: {node['type']}.{out['name']} is not shown"
            shown.append(f"{node['type']}.{out['name']}")
    assert path.name not in IMAGE_WORKFLOWS or sorted(shown) == [
        "DitPruneApplyPruning.report",
        "DitPruneCalibrate.summary",
        "DitPruneClusterWeights.summary",
        "DitPruneCompare.metrics",
        "DitPruneHeldOutCheck.report",
        "DitPruneSavePrunedModel.path",
        "DitPruneSavePrunedModel.size",
    ]
    assert path.name not in RECONSTRUCT_WORKFLOWS or sorted(shown) == [
        "DitPruneCompare.metrics",
        "DitPruneHeldOutCheck.report",
        "DitPrunePruneAndReconstruct.report",
        "DitPruneSavePrunedModel.path",
        "DitPruneSavePrunedModel.size",
    ]
    assert "PreviewAny" in all_nodes  # ComfyUI's own display node (comfy_extras/nodes_preview_any.py)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_loaders_say_where_their_files_come_from(path: Path, comfy: Comfy) -> None:
    import folder_paths

    workflow = _load(path)
    named = 0
    for node in workflow["nodes"]:
        files = [w for w in node["widgets_values"] if isinstance(w, str) and w.endswith(".safetensors")]
        if node["type"].startswith("DitPrune") or not files:
            continue
        models = {m["name"]: m for m in node["properties"].get("models", [])}
        assert set(files) <= set(models), f"{node['type']} names {files} without download metadata"
        for name in files:
            model = models[name]
            # the missing-models dialog offers only huggingface/civitai .safetensors downloads
            assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + name)
            assert model["directory"] in folder_paths.folder_names_and_paths, model
            named += 1
    if path.name in IMAGE_WORKFLOWS | RECONSTRUCT_WORKFLOWS:
        assert named == 4  # flux: unet, clip_l, t5xxl, ae; sd35: checkpoint, clip_l, clip_g, t5xxl


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_save_format_and_the_loader_that_opens_it(path: Path) -> None:
    """Every workflow saves compressed (the smaller file it is run for); its note says that opens in
    Load Pruned Model, and that a dense file would open in the stock Load Diffusion Model."""
    (save,) = [n for n in _load(path)["nodes"] if n["type"] == "DitPruneSavePrunedModel"]
    assert save["widgets_values"][1] == "compressed"
    notes = " ".join(n["widgets_values"][0] for n in _load(path)["nodes"] if n["type"] == "Note")
    assert "Load Diffusion Model" in notes and "Load Pruned Model" in notes
    assert "format compressed (here)" in notes


@pytest.mark.parametrize("name", sorted(RECONSTRUCT_WORKFLOWS))
def test_reconstruction_variant_matches_its_plain_workflow(name: str, all_nodes: dict[str, Any]) -> None:
    """Prune and Reconstruct gets the plain workflow's model, prompt and latent and its Calibrate's
    sampler settings, at sparsity 0.5 with the automatic memory budget; its MODEL goes to a sampler
    (decoded and previewed) and to Save; its note says what a run costs."""
    variant = _load(REPO / "workflows" / name)
    plain_name = "ditprune_flux1_dev.json" if name in TIER_WORKFLOWS else name.replace("_reconstruct", "")
    plain = _load(REPO / "workflows" / plain_name)

    def by_type(workflow: dict[str, Any], node_type: str) -> list[dict[str, Any]]:
        return [n for n in workflow["nodes"] if n["type"] == node_type]

    def sources(workflow: dict[str, Any], node: dict[str, Any]) -> dict[str, tuple[str, int]]:
        """input name -> (type of the node it comes from, that node's slot)."""
        nodes = {n["id"]: n for n in workflow["nodes"]}
        return {
            node["inputs"][dst_slot]["name"]: (nodes[src]["type"], src_slot)
            for _lid, src, src_slot, dst, dst_slot, _t in workflow["links"]
            if dst == node["id"]
        }

    (recon,) = by_type(variant, "DitPrunePruneAndReconstruct")
    (calibrate,) = by_type(plain, "DitPruneCalibrate")
    schema = _inputs(all_nodes["DitPrunePruneAndReconstruct"])
    widgets = [k for k, (kind, _) in schema.items() if kind in WIDGET_TYPES]
    values = dict(zip(["seed", "control", *widgets[1:]], recon["widgets_values"], strict=True))
    assert values["memory_budget_gb"] == 0.0 and values["metric"] == "energy"
    assert name in TIER_WORKFLOWS or (values["sparsity"] == 0.5 and values["value_bits"] == "none")
    # seed, control, steps, cfg, sampler, scheduler, weighting: as the plain workflow calibrates
    assert recon["widgets_values"][:7] == calibrate["widgets_values"][:7]
    assert sources(variant, recon) == {
        **{k: v for k, v in sources(plain, calibrate).items() if k != "calibration"},
        "prompt_set": ("DitPrunePromptSet", 0),  # calibrated on the shipped prompt set
    }
    # the held-out check: dense vs reconstructed on the same set, shown as text and a grid
    (check,) = by_type(variant, "DitPruneHeldOutCheck")
    assert {k: v[0] for k, v in sources(variant, check).items()} == {
        "model": sources(variant, recon)["model"][0],
        "pruned_model": "DitPrunePruneAndReconstruct",
        "prompt_set": "DitPrunePromptSet",
        "negative": sources(variant, recon)["negative"][0],
        "latent_image": "EmptySD3LatentImage",
        "vae": "VAELoader" if "flux" in name else "CheckpointLoaderSimple",
    }
    (prompts,) = by_type(variant, "DitPrunePromptSet")
    assert prompts["widgets_values"][0] == "(shipped default set)"
    assert sources(variant, prompts)["clip"][0] in ("DualCLIPLoader", "TripleCLIPLoader")
    # the reconstructed and the dense model, sampled alike, decoded, compared
    samplers = by_type(variant, "KSampler")
    assert [sources(variant, s)["model"][0] for s in samplers] == [
        "DitPrunePruneAndReconstruct",
        sources(plain, calibrate)["model"][0],
    ]
    assert samplers[0]["widgets_values"] == samplers[1]["widgets_values"]
    (save,) = by_type(variant, "DitPruneSavePrunedModel")
    assert sources(variant, save)["model"] == ("DitPrunePruneAndReconstruct", 0)
    assert [sources(variant, d)["samples"] for d in by_type(variant, "VAEDecode")] == [("KSampler", 0)] * 2
    (compare,) = by_type(variant, "DitPruneCompare")
    assert sources(variant, compare) == {"dense": ("VAEDecode", 0), "pruned": ("VAEDecode", 0)}
    titles = [g["title"] for g in variant["groups"]]
    assert titles == [
        "1 · Load",
        "2 · Prune and reconstruct",
        "3 · Sample dense vs reconstructed",
        "4 · Compare",
        "5 · Save",
        "6 · Prompt set & held-out check",
    ]
    notes = " ".join(n["widgets_values"][0] for n in by_type(variant, "Note"))
    assert "the sampler runs once per pass" in notes and "models/diffusion_models/" in notes


def test_reconstruction_notes_quote_the_passes_the_planner_makes(comfy: Comfy) -> None:
    """make_workflows.GRAM_GIB, quoted in the notes: the Gram GiB of the layers Prune and Reconstruct
    prunes with the workflows' widgets, on full-size FLUX.1-dev and SD3.5 Large (meta tensors), and
    the passes ditprune's planner makes of them at 8 and 4 GiB."""
    import sys

    from tiny_models import sd3_shapes

    from ditprune_core.config import PruneConfig
    from ditprune_core.dit_shapes import SHAPES, DitShapes, module_tree
    from ditprune_core.layers import remainder_layers
    from ditprune_core.prune import select_layers
    from ditprune_core.reconstruct import plan_groups

    node_module = sys.modules[comfy.node("DitPrunePruneAndReconstruct").__module__]
    _sparsity, families = node_module.pruning_choice(0.5, "unstructured", True, True, True, False)
    sd35 = sd3_shapes(38, ctx=4096, adm=2048)  # SD3.5 Large: 38 blocks of 2432 (its q/k norms aside)
    linears = [k.removesuffix(".weight") for k, v in sd35.items() if k.endswith(".weight") and len(v) == 2]
    full = {
        "flux1-dev": module_tree(SHAPES["flux"]()),
        "sd3.5-large": module_tree(DitShapes(shapes=sd35, linears=linears)),
    }
    gib = 1 << 30
    quoted = _generator()["GRAM_GIB"]
    assert set(quoted) == set(full)
    for name, module in full.items():
        layers = select_layers(module, PruneConfig(0.5, families=families))
        ins = [(n, layer.in_features) for n, layer in layers.items()]
        total = round(sum(4 * f * f for _n, f in ins) / gib, 1)
        assert quoted[name] == (total, len(plan_groups(ins, 8 * gib)), len(plan_groups(ins, 4 * gib))), name
    # a GPTQ remainder (PruneConfig.remainder_bits) adds the Grams of the blocks' other Linear layers
    flux = full["flux1-dev"]
    selected = select_layers(flux, PruneConfig(0.5, families=families))
    named = dict(flux.named_modules())
    rest = [named[n].in_features for n in remainder_layers(flux) if n not in selected]
    assert len(rest) == 76  # 19 double blocks x 2 streams + 38 single blocks
    assert _generator()["REMAINDER_GRAM_GIB"] == {"flux1-dev": round(sum(4 * f * f for f in rest) / gib, 1)}


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_layout_nodes_apart_and_inside_their_groups(path: Path) -> None:
    workflow = _load(path)
    boxes = {n["id"]: _box(n) for n in workflow["nodes"]}
    for (i, a), (j, b) in itertools.combinations(boxes.items(), 2):
        assert not _overlap(a, b), f"{path.name}: node {i} overlaps node {j}"
    groups = workflow["groups"]
    titles = [g["title"] for g in groups]
    assert groups, f"{path.name} has no groups"
    assert path.name not in IMAGE_WORKFLOWS or titles == [
        "1 · Load",
        "2 · Calibrate",
        "3 · Score & cluster",
        "4 · Prune",
        "5 · Sample dense vs pruned",
        "6 · Compare",
        "7 · Save & held-out check",
    ]
    rects = [(x, y, x + w, y + h) for x, y, w, h in (g["bounding"] for g in groups)]
    for a, b in itertools.combinations(range(len(rects)), 2):
        assert not _overlap(rects[a], rects[b]), f"groups {titles[a]} and {titles[b]} overlap"
    for node_id, (x0, y0, x1, y1) in boxes.items():
        inside = [
            t
            for t, (gx0, gy0, gx1, gy1) in zip(titles, rects, strict=True)
            if gx0 <= x0 and gy0 + 30 <= y0 and x1 <= gx1 and y1 <= gy1
        ]  # below the title band
        assert len(inside) == 1, f"{path.name}: node {node_id} is in groups {inside}"
    for title, (gx0, gy0, gx1, gy1) in zip(titles, rects, strict=True):
        notes = [
            n
            for n in workflow["nodes"]
            if n["type"] == "Note" and _overlap(boxes[n["id"]], (gx0, gy0, gx1, gy1))
        ]
        assert len(notes) == 1, f"{title} has {len(notes)} notes"
    # the whole graph at a readable zoom on a 1600x1000 window (the frontend's canvas is 1536x922)
    ds = workflow["extra"]["ds"]
    assert ds["scale"] >= 0.6  # below ~0.57 the frontend stops drawing text (low-detail mode)
    left, top = (-ds["offset"][0]), (-ds["offset"][1])
    right, bottom = left + 1536 / ds["scale"], top + 922 / ds["scale"]
    for gx0, gy0, gx1, gy1 in rects:
        assert left <= gx0 and top <= gy0 and gx1 <= right and gy1 <= bottom


def _bezier(a: tuple[float, float], b: tuple[float, float], steps: int = 60) -> list[tuple[float, float]]:
    """litegraph's spline between an output (a) and an input (b): horizontal tangents, d/4 long."""
    d = math.dist(a, b) * 0.25
    c1, c2 = (a[0] + d, a[1]), (b[0] - d, b[1])
    pts = []
    for k in range(steps + 1):
        t = k / steps
        u = 1 - t
        pts.append(
            (
                u**3 * a[0] + 3 * u * u * t * c1[0] + 3 * u * t * t * c2[0] + t**3 * b[0],
                u**3 * a[1] + 3 * u * u * t * c1[1] + 3 * u * t * t * c2[1] + t**3 * b[1],
            )
        )
    return pts


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_direct_links_run_clear_of_other_nodes(path: Path) -> None:
    """Links without reroutes, drawn as the frontend draws them, cross no node they don't end at.
    (tests/comfyui/test_browser.py checks every link, rerouted ones too, on the rendered canvas.)"""
    workflow = _load(path)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    routed = {e["id"] for e in workflow["extra"].get("linkExtensions", [])}
    for link_id, src, src_slot, dst, dst_slot, _kind in workflow["links"]:
        if link_id in routed:
            continue
        s, t = nodes[src], nodes[dst]
        start = (s["pos"][0] + s["size"][0] - 9, s["pos"][1] + (src_slot + 0.7) * SLOT)
        end = (t["pos"][0] + 10, t["pos"][1] + (dst_slot + 0.7) * SLOT)
        points = _bezier(start, end)
        for other_id, other in nodes.items():
            if other_id in (src, dst):
                continue
            x0, y0, x1, y1 = _box(other)
            hits = [p for p in points if x0 + 3 < p[0] < x1 - 3 and y0 + 3 < p[1] < y1 - 3]
            assert not hits, (
                f"{path.name}: link {link_id} ({s['type']} -> {t['type']}) runs behind node {other_id}"
            )


def test_readme_names_every_workflow() -> None:
    readme = (REPO / "README.md").read_text()
    for path in WORKFLOWS:
        assert f"workflows/{path.name}" in readme, f"README.md does not mention workflows/{path.name}"
