"""The example workflows in the real ComfyUI frontend: a local server on 127.0.0.1 and headless
Chromium (Debian's ``chromium`` package) driven over the DevTools protocol.

Skips, with the reason, where Chromium is not installed. ``DITPRUNE_WRITE_SCREENSHOTS=1`` writes
the README's screenshots (docs/) from this run; otherwise they go to pytest's tmp folder. (The
template thumbnails, workflows/*.jpg, are title cards that make_workflows.py writes.)
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from browser import APP_READY, SETTINGS, chromium_page, comfy_server, find_chromium, geometry_js
from conftest import REPO, Comfy
from safetensors.torch import save_file
from tiny_models import flux_shapes, random_state_dict

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: `apt-get install chromium` (Debian) or set $DITPRUNE_CHROMIUM to run "
    "the browser checks",
)
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_workflows", REPO / "workflows" / "make_workflows.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: a custom node module for the test server only: ComfyUI hard-codes FLUX.1's width, so the tiny
#: FLUX loads with the detection read from its shapes (tests/comfyui/tiny_models.py)
TINY_FLUX_DETECTION = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from tiny_models import flux_detection_from_shapes
_KEPT = flux_detection_from_shapes()  # held: a dropped generator would undo the patch when collected
_KEPT.__enter__()  # for the life of this test server
NODE_CLASS_MAPPINGS = {{}}
"""


def _run_workflow() -> dict[str, Any]:
    """A graph that runs on the tiny random FLUX with no text encoder: its text outputs and plots
    are what must appear in the page (Compare gets two flat images of different grey)."""
    mw = _generator()
    g = mw.Graph()
    unet = g.add("UNETLoader", (0, 0), ["tiny_flux.safetensors", "default"], [], [("MODEL", "MODEL")])
    score = g.add(
        "DitPruneScoreSaliency",
        (0, 0),
        ["magnitude", 0.4, "none", 0.5],
        [("calibration", "DITPRUNE_CALIBRATION")],
        [("saliency", "DITPRUNE_SALIENCY")],
    )
    cluster = g.add(
        "DitPruneClusterWeights",
        (0, 0),
        ["layer", 0, 4, 0.5, 1.0, "row", 0, "fixed", "single_blocks.0.linear1"],
        [("model", "MODEL"), ("saliency", "DITPRUNE_SALIENCY")],
        [("clusters", "DITPRUNE_CLUSTERS"), ("plot", "IMAGE"), ("summary", "STRING")],
    )
    g.link(unet, 0, cluster, "model")
    g.link(score, 0, cluster, "saliency")
    apply = g.add(
        "DitPruneApplyPruning",
        (0, 0),
        [0.5, "2:4", True, True, True, False, ""],
        [("model", "MODEL"), ("saliency", "DITPRUNE_SALIENCY"), ("clusters", "DITPRUNE_CLUSTERS")],
        [("MODEL", "MODEL"), ("report", "STRING"), ("sparsity per block", "IMAGE")],
    )
    g.link(unet, 0, apply, "model")
    g.link(score, 0, apply, "saliency")
    g.link(cluster, 0, apply, "clusters")
    save = g.add(
        "DitPruneSavePrunedModel",
        (0, 0),
        ["browser", "compressed", "int4", "auto", "int8"],
        [("model", "MODEL")],
        [("path", "STRING"), ("size", "STRING")],
    )
    g.link(apply, 0, save, "model")
    images = [
        g.add("EmptyImage", (0, 0), [64, 64, 1, colour], [], [("IMAGE", "IMAGE")])
        for colour in (0x808080, 0x848484)
    ]
    compare = g.add(
        "DitPruneCompare",
        (0, 0),
        [4.0],
        [("dense", "IMAGE"), ("pruned", "IMAGE")],
        [("metrics", "STRING"), ("difference", "IMAGE")],
    )
    g.link(images[0], 0, compare, "dense")
    g.link(images[1], 0, compare, "pruned")
    shown = {}
    for src, slot in ((cluster, 2), (apply, 1), (save, 0), (compare, 0), (save, 1)):
        key = (src, slot) if (src, slot) == (save, 1) else src
        shown[key] = g.add("PreviewAny", (0, 0), [], [("source", "*")], [])
        g.link(src, slot, shown[key], "source")
    plots = {}
    for src, slot, title in ((cluster, 1, "2-D weight space"), (apply, 2, "sparsity per block")):
        plots[title] = g.add("PreviewImage", (0, 0), [], [("images", "IMAGE")], [], title=title)
        g.link(src, slot, plots[title], "images")
    # by hand, so that every text box is large enough to read
    for node, x, y, w, h in (
        (unet, 0, 0, 300, 82),
        (score, 0, 140, 300, 130),
        (images[0], 0, 330, 300, 106),
        (images[1], 0, 500, 300, 106),
        (cluster, 350, 0, 300, 290),
        (compare, 350, 380, 300, 78),
        (apply, 700, 0, 300, 242),
        (shown[cluster], 700, 330, 300, 110),
        (shown[compare], 700, 490, 300, 120),
        (save, 1050, 0, 300, 160),
        (shown[apply], 1050, 220, 460, 220),
        (shown[save], 1050, 490, 460, 90),
        (shown[(save, 1)], 1050, 630, 460, 130),
        (plots["2-D weight space"], 1560, 0, 340, 330),
        (plots["sparsity per block"], 1560, 380, 340, 330),
    ):
        g.place(node, x, y, w, h)
    g.fit_view()
    workflow = g.to_json()
    return workflow


@pytest.fixture(scope="module")
def results(comfy: Comfy, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One server and one browser for the module: each workflow loaded, then a small run."""
    base = tmp_path_factory.mktemp("browserbase")
    (base / "models" / "diffusion_models").mkdir(parents=True)
    import torch

    save_file(
        random_state_dict(flux_shapes(), seed=9, dtype=torch.bfloat16),
        str(base / "models/diffusion_models/tiny_flux.safetensors"),
    )
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "tiny_flux_detection.py").write_text(TINY_FLUX_DETECTION)
    write = os.environ.get("DITPRUNE_WRITE_SCREENSHOTS") == "1"
    shots = REPO / "docs" if write else tmp_path_factory.mktemp("screenshots")
    assert CHROMIUM is not None
    return asyncio.run(_drive(CHROMIUM, comfy.root, base, shots))


async def _drive(chromium: str, root: Path, base: Path, shots: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"workflows": {}, "shots": shots}
    with comfy_server(root, base) as url:
        async with chromium_page(chromium, url) as page:
            await page.wait_js(APP_READY, 120)
            settings = json.dumps(SETTINGS)
            await page.js(
                f"(async () => {{ for (const [k, v] of Object.entries({settings})) "
                "await app.extensionManager.setting.set(k, v); })()"
            )
            await page.wait_js("document.readyState === 'complete'")
            await asyncio.sleep(1)
            await page.js("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click())")
            out["canvas"] = await page.js(
                "(() => { const r = app.canvas.canvas.getBoundingClientRect(); "
                "return [r.width, r.height]; })()"
            )
            for path in WORKFLOWS:
                await page.js(f"app.loadGraphData({path.read_text()})")
                await asyncio.sleep(1.5)
                dialogs = await page.js(
                    "Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)"
                )
                await page.js("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click())")
                await asyncio.sleep(0.6)
                geometry = await page.js(geometry_js())
                stem = path.stem
                await page.screenshot(shots / f"workflow_{stem.removeprefix('ditprune_')}.png")
                out["workflows"][path.name] = {"dialogs": dialogs, **geometry}
            await page.js(f"app.loadGraphData({json.dumps(_run_workflow())})")
            await asyncio.sleep(1)
            await page.js("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click())")
            await page.js("app.queuePrompt(0, 1)")
            texts = await page.wait_js(
                """(() => {
                  const areas = Array.from(document.querySelectorAll('textarea'))
                    .filter(t => t.readOnly && t.value && t.getBoundingClientRect().width > 0);
                  return areas.length >= 5 ? areas.map(t => t.value) : null;
                })()""",
                180,
            )
            await asyncio.sleep(0.5)
            out["run_texts"] = texts
            # the plots as the page shows them: each preview node holds its loaded image
            out["run_images"] = await page.js(
                """(() => app.graph._nodes.filter(n => n.type === 'PreviewImage').map(n => ({
                  title: n.title,
                  images: (n.imgs || []).map(i => [i.naturalWidth, i.naturalHeight, i.complete]),
                })))()"""
            )
            out["run_shot"] = await page.screenshot(shots / "browser_run_results.png")
            out["console"] = page.console
    return out


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_loads_cleanly(path: Path, results: dict[str, Any]) -> None:
    loaded = results["workflows"][path.name]
    assert [n for n in loaded["nodes"] if not n["registered"]] == []
    # the only dialog is the missing-models one (no weights here), offering every file's download
    assert len(loaded["dialogs"]) <= 1, loaded["dialogs"]
    for text in loaded["dialogs"]:
        assert text.startswith("Missing Models"), text
        assert "not allowed" not in text and "Invalid directory" not in text, text
        workflow = json.loads(path.read_text())
        for node in workflow["nodes"]:
            for model in node["properties"].get("models", []):
                assert f"{model['directory']} / {model['name']}" in text
    assert "Missing Node" not in " ".join(loaded["dialogs"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_reads_at_a_glance(path: Path, results: dict[str, Any]) -> None:
    """As rendered: no node overlaps another, no link is drawn behind a node, readable zoom."""
    loaded = results["workflows"][path.name]
    rects = [(n["id"], n["rect"]) for n in loaded["nodes"]]
    for i, (a_id, (ax, ay, aw, ah)) in enumerate(rects):
        for b_id, (bx, by, bw, bh) in rects[i + 1 :]:
            assert not (ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah), (a_id, b_id)
    assert loaded["behind"] == []
    assert loaded["scale"] >= 0.6
    titles = [g["title"] for g in loaded["groups"]]
    assert titles and [t.split(" ")[0] for t in titles] == [str(i) for i in range(1, len(titles) + 1)]
    # what make_workflows.CANVAS_1600x1000 assumes (the workflows' saved view fits this canvas)
    assert abs(results["canvas"][0] - 1536) <= 4 and abs(results["canvas"][1] - 922) <= 4


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_notes_show_their_whole_text(path: Path, results: dict[str, Any]) -> None:
    """At the workflow's own (fit) view, no Note's text overflows its box (its textarea would scroll)."""
    notes = results["workflows"][path.name]["notes"]
    assert notes and all(n["overflow"] is not None for n in notes), notes
    assert [n for n in notes if n["overflow"] > 1] == []


@pytest.mark.parametrize(
    "path", [p for p in WORKFLOWS if re.search(r"_\d+gb\.json$", p.name)], ids=lambda p: p.name
)
def test_per_gpu_workflows_carry_what_their_notes_promise(path: Path, results: dict[str, Any]) -> None:
    """The per-GPU workflows, as the frontend loaded them: Prune and Reconstruct's and Save's widgets
    are the held-out frontier's choice for that card (docs/bench/frontier.json through the chooser),
    and the note names the same setting and figures."""
    from ditprune_core.tiers import choose_tier

    gib = int(re.search(r"_(\d+)gb\.json$", path.name)[1])  # type: ignore[index]
    choice = choose_tier(json.loads((REPO / "docs" / "bench" / "frontier.json").read_text()), gib)
    loaded = {w["type"]: w["values"] for w in results["workflows"][path.name]["widgets"]}
    recon, save = loaded["DitPrunePruneAndReconstruct"], loaded["DitPruneSavePrunedModel"]
    # seed, control, steps, cfg, sampler, scheduler, weighting, metric, sparsity, pattern, ...
    assert (recon[8], recon[9]) == (choice.sparsity, choice.pattern)
    assert recon[16] == ("none" if choice.value_bits is None else str(choice.value_bits))
    assert recon[17:20] == [0, choice.target_file_gb, str(choice.value_group)]  # refinement, target, group
    assert save[1:] == ["compressed", "size target", "auto", "size target"]
    (note,) = [
        w["values"][0]
        for w in results["workflows"][path.name]["widgets"]
        if w["type"] == "Note" and w["values"][0].startswith("For ")
    ]
    kind = f"{choice.sparsity:.0%} sparsity" if choice.sparsity else "no pruning (quantise only)"
    assert f"target_file_gb {choice.target_file_gb} picks {kind}" in note
    assert f"remainder {choice.remainder}" in note
    assert f"File {choice.file_gb:.2f} GB" in note and f"VRAM {choice.vram_gb:.2f} GB" in note


def test_text_results_are_visible_after_a_run(results: dict[str, Any]) -> None:
    texts = "\n".join(results["run_texts"])
    assert "PSNR" in texts and "relative error" in texts  # Compare
    assert "k=1" in texts  # Cluster summary (layer granularity)
    assert re.search(r"pruned [\d,]+ of [\d,]+ weights in \d+ layers: 50\.00%", texts)  # Apply, 2:4
    assert "models/diffusion_models/browser_00001.safetensors" in texts  # Save path
    # Save's size, on screen: file size, bits per weight, ratio to dense, VRAM to load it
    size = re.search(
        r"size [\d.]+ [kM]B, (?P<bpw>[\d.]+) bits per weight, ratio (?P<ratio>[\d.]+)% of the dense model "
        r"\([\d.]+ [kM]B in bfloat16\); VRAM to load it: [\d.]+ [kM]B \(weights \+ the largest decoded layer",
        texts,
    )
    assert size, texts
    assert 2 < float(size["bpw"]) < 16 and 10 < float(size["ratio"]) < 100  # int4 values, int8 remainder
    assert results["run_shot"].stat().st_size > 10_000


def test_both_plots_are_shown_after_a_run(results: dict[str, Any]) -> None:
    """The cluster plot and the sparsity chart (matplotlib, labelled; tests/test_plots.py and
    test_nodes.py check their axes and legends) reach the page as loaded images."""
    shown = {p["title"]: p["images"] for p in results["run_images"]}
    for title in ("2-D weight space", "sparsity per block"):
        assert shown[title] == [[340, 320, True]], (title, shown)


def test_template_thumbnails_are_title_cards() -> None:
    for path in WORKFLOWS:
        thumb = path.with_suffix(".jpg")
        assert thumb.read_bytes()[:2] == b"\xff\xd8"  # a JPEG
