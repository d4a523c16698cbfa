"""Writes the example workflows (ComfyUI UI format) next to this file.

    python workflows/make_workflows.py          # refuses to overwrite; --force to regenerate

load -> calibrate -> score & cluster -> prune -> sample dense vs pruned -> compare -> save, for
FLUX.1-dev and SD3.5, laid out in titled groups that read at 1600x1000. Every text output goes to
ComfyUI's own Preview Any node, so it shows in the graph after a run; the loaders carry the model
download metadata (``properties.models``) that the frontend's missing-models dialog reads.
tests/comfyui/test_workflows.py checks the files against the live node schemas and the layout (no
overlaps, groups hold their nodes, links clear of nodes); tests/comfyui/test_browser.py loads them
in the real frontend.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# litegraph's geometry (ComfyUI frontend 1.27): a node's title bar sits above its ``pos``
TITLE = 30
SLOT = 20
CANVAS_1600x1000 = (1536, 922)  # measured: the canvas element in a 1600x1000 window
GROUP_HEAD = 40  # a group's title band
PAD = 15  # group border around its nodes
# smallest heights the frontend gives these nodes (measured in the browser, computeSize()); a
# serialised size below them would be enlarged on load and could overlap its neighbour
MIN_HEIGHT = {
    "UNETLoader": 82,
    "DualCLIPLoader": 130,
    "TripleCLIPLoader": 106,
    "CheckpointLoaderSimple": 98,
    "VAELoader": 58,
    "CLIPTextEncode": 88,
    "FluxGuidance": 58,
    "EmptySD3LatentImage": 106,
    "DitPruneCalibrate": 326,  # 306 + the prompt_set socket
    "DitPruneScoreSaliency": 130,
    "DitPruneClusterWeights": 290,
    "DitPruneApplyPruning": 242,
    "KSampler": 262,
    "VAEDecode": 46,
    "PreviewImage": 26,
    "DitPruneCompare": 78,
    "DitPruneSavePrunedModel": 160,
    "DitPrunePruneAndReconstruct": 636,  # as the frontend draws it: prompt_set, target_file_gb, value_group
    "PreviewAny": 88,
    "Note": 88,
    "DitPrunePromptSet": 208,
    "DitPruneHeldOutCheck": 330,
}
# the frontend draws these; the backend has no such node
FRONTEND_ONLY = {"Note", "MarkdownNote"}

# group colours from the frontend's palette (LGraphCanvas.node_colors ... groupcolor)
COLOURS = {
    "load": "#3f789e",
    "calibrate": "#8A8",
    "score": "#88A",
    "prune": "#b58b2a",
    "sample": "#a1309b",
    "compare": "#b06634",
    "save": "#8AA",
    "reconstruct": "#b58b2a",
    "held_out": "#3f5f5f",
}

# where each model file comes from and which models/ folder it goes in (the frontend offers the
# download when the file is missing; README "Model files" lists the same)
MODELS = {
    "flux1-dev.safetensors": (
        "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors",
        "diffusion_models",
    ),
    "clip_l.safetensors": (
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
        "text_encoders",
    ),
    "t5xxl_fp16.safetensors": (
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
        "text_encoders",
    ),
    "ae.safetensors": (
        "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
        "vae",
    ),
    "sd3.5_large.safetensors": (
        "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/resolve/main/sd3.5_large.safetensors",
        "checkpoints",
    ),
    "wan2.1_t2v_14B_bf16.safetensors": (
        "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/diffusion_models/wan2.1_t2v_14B_bf16.safetensors",
        "diffusion_models",
    ),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": (
        "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        "text_encoders",
    ),
    "wan_2.1_vae.safetensors": (
        "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/vae/wan_2.1_vae.safetensors",
        "vae",
    ),
    "clip_g.safetensors": (
        "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/resolve/main/text_encoders/clip_g.safetensors",
        "text_encoders",
    ),
}


# the Note widget's text (frontend 1.27, measured in the browser check: no note may scroll): average
# glyph width and line height in px, and the textarea's padding
NOTE_CHAR, NOTE_LINE, NOTE_PAD = 7.3, 16.5, 22


def note_height(text: str, width: int) -> int:
    """The height a Note of ``width`` needs to show ``text`` whole (wrapped at word boundaries)."""
    per_line = max(1, int((width - NOTE_PAD) / NOTE_CHAR))
    lines = 0
    for paragraph in text.split("\n"):
        current = 0
        lines += 1
        for word in paragraph.split(" "):
            if current and current + 1 + len(word) > per_line:
                lines += 1
                current = len(word)
            else:
                current += (1 if current else 0) + len(word)
    return int(NOTE_PAD + NOTE_LINE * lines) + 4


class Graph:
    def __init__(self) -> None:
        self.nodes: list[dict[str, Any]] = []
        self.links: list[list[Any]] = []
        self.groups: list[dict[str, Any]] = []
        self.reroutes: list[dict[str, Any]] = []
        self.link_parents: dict[int, int] = {}
        self.view: dict[str, Any] | None = None
        self.placed = False  # set by place(): the layout is by hand, arrange() is not used
        self.named: dict[str, int] = {}  # nodes a later group links from (the text encoder)

    def add(
        self,
        node_type: str,
        pos: tuple[int, int],
        widgets: list[Any],
        inputs: list[tuple[str, str]],
        outputs: list[tuple[str, str]],
        title: str | None = None,
        *,
        size: tuple[int, int] | None = None,
    ) -> int:
        node_id = len(self.nodes) + 1
        node: dict[str, Any] = {
            "id": node_id,
            "type": node_type,
            "pos": list(pos),
            "size": list(size) if size else [320, 60 + 24 * (len(widgets) + len(inputs))],
            "flags": {},
            "order": node_id - 1,
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
            "outputs": [
                {"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)
            ],
            "properties": {"Node name for S&R": node_type},
            "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        models = [
            {"name": w, "url": MODELS[w][0], "directory": MODELS[w][1]}
            for w in widgets
            if isinstance(w, str) and w in MODELS
        ]
        if models:
            node["properties"]["models"] = models
        self.nodes.append(node)
        return node_id

    def note(self, pos: tuple[int, int], width: int, height: int, text: str, title: str) -> int:
        node = self.add("Note", pos, [text], [], [], title=title, size=(width, height))
        self.nodes[node - 1]["properties"] = {}
        return node

    def reroute(self, pos: tuple[int, int], parent: int | None = None) -> int:
        """A native reroute (frontend 1.27, workflow version 0.4); ``parent`` is the one before it."""
        rid = len(self.reroutes) + 1
        entry: dict[str, Any] = {"id": rid, "pos": list(pos), "linkIds": []}
        if parent is not None:
            entry["parentId"] = parent
        self.reroutes.append(entry)
        return rid

    def link(self, src: int, src_slot: int, dst: int, input_name: str, *, via: int | None = None) -> None:
        """Connect; ``via`` is the last reroute of the chain the link runs through."""
        link_id = len(self.links) + 1
        source, target = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, inp in enumerate(target["inputs"]) if inp["name"] == input_name)
        link_type = source["outputs"][src_slot]["type"]
        target["inputs"][slot]["link"] = link_id
        source["outputs"][src_slot]["links"].append(link_id)
        self.links.append([link_id, src, src_slot, dst, slot, link_type])
        if via is not None:
            self.link_parents[link_id] = via
            rid: int | None = via
            while rid is not None:
                reroute = self.reroutes[rid - 1]
                reroute["linkIds"].append(link_id)
                rid = reroute.get("parentId")

    def wrap(self, src: int, src_slot: int, dst: int, input_name: str, *, via: int | None = None) -> int:
        """Link to a node below in the same column without crossing either: the link returns under
        the source, through the gap, and runs down the column's left margin. Returns the margin
        reroute, which later links of ``src`` can continue from (``via``)."""
        x, y, w, h = self.box(src)
        if via is None:
            right = self.reroute((x + w + 12, y + h + 10))
            via = self.reroute((x - 8, y + h + 10), right)
        target = self.box(dst)
        slot = next(i for i, inp in enumerate(self.nodes[dst - 1]["inputs"]) if inp["name"] == input_name)
        drop = self.reroute((x - 8, target[1] + TITLE + int((slot + 0.7) * SLOT)), via)
        self.link(src, src_slot, dst, input_name, via=drop)
        return via

    def place(self, node: int, x: int, y: int, width: int, height: int | None = None) -> tuple[int, int]:
        """Put a node's title bar top-left at (x, y); returns its bottom-left corner."""
        entry = self.nodes[node - 1]
        self.placed = True
        h = max(height or 0, MIN_HEIGHT.get(entry["type"], 26))
        if entry["type"] == "Note":  # never shorter than its text
            h = max(h, note_height(entry["widgets_values"][0], width))
        entry["pos"] = [x, y + TITLE]
        entry["size"] = [width, h]
        return x, y + TITLE + h

    def group(self, title: str, colour: str, members: list[int]) -> None:
        """A titled group drawn around ``members`` (title band above, PAD around)."""
        rects = [self.box(m) for m in members]
        x0 = min(r[0] for r in rects) - PAD
        y0 = min(r[1] for r in rects) - GROUP_HEAD
        x1 = max(r[0] + r[2] for r in rects) + PAD
        y1 = max(r[1] + r[3] for r in rects) + PAD
        self.groups.append(
            {
                "id": len(self.groups) + 1,
                "title": title,
                "bounding": [x0, y0, x1 - x0, y1 - y0],
                "color": colour,
                "font_size": 24,
                "flags": {},
            }
        )

    def box(self, node: int) -> tuple[int, int, int, int]:
        """The rectangle a node covers on the canvas, title bar included: (x, y, w, h)."""
        n = self.nodes[node - 1]
        return n["pos"][0], n["pos"][1] - TITLE, n["size"][0], n["size"][1] + TITLE

    def fit_view(
        self, canvas: tuple[int, int] = CANVAS_1600x1000, margin: tuple[int, int, int, int] = (12, 12, 12, 12)
    ) -> None:
        """Open the workflow zoomed so that every group shows on the ``canvas`` (the frontend's
        canvas at a 1600x1000 window: the side bar and menu take the rest), ``margin`` (left, top,
        right, bottom) around it."""
        rects = [g["bounding"] for g in self.groups] + [self.box(n["id"]) for n in self.nodes]
        rects += [[r["pos"][0], r["pos"][1], 0, 0] for r in self.reroutes]
        x0 = min(r[0] for r in rects)
        y0 = min(r[1] for r in rects)
        x1 = max(r[0] + r[2] for r in rects)
        y1 = max(r[1] + r[3] for r in rects)
        left, top, right, bottom = margin
        scale = min((canvas[0] - left - right) / (x1 - x0), (canvas[1] - top - bottom) / (y1 - y0))
        self.view = {
            "scale": round(scale, 4),
            "offset": [round(left / scale - x0, 1), round(top / scale - y0, 1)],
        }

    def arrange(self) -> None:
        """Columns by distance from the loaders, nodes stacked in each column: nothing overlaps."""
        depth = {n["id"]: 0 for n in self.nodes}
        for _ in self.nodes:
            for _lid, src, _s, dst, _d, _t in self.links:
                depth[dst] = max(depth[dst], depth[src] + 1)
        heights: dict[int, int] = {}
        for node in self.nodes:
            column = depth[node["id"]]
            slots = max(len(node["inputs"]), len(node["outputs"])) + len(node["widgets_values"])
            height = 46 + 24 * slots + (120 if node["type"] == "PreviewImage" else 0)
            y = heights.get(column, 40)
            node["pos"] = [column * 390, y]
            node["size"] = [320, height]
            heights[column] = y + height + 80

    def to_json(self) -> dict[str, Any]:
        if not self.placed:  # no hand layout: stack columns automatically
            self.arrange()
        extra: dict[str, Any] = {"ditprune": "example"}
        if self.reroutes:
            extra["reroutes"] = self.reroutes
            extra["linkExtensions"] = [{"id": k, "parentId": v} for k, v in sorted(self.link_parents.items())]
        if self.view:
            extra["ds"] = self.view
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": extra,
            "version": 0.4,
        }


# --- the FLUX / SD3.5 layout ---------------------------------------------------------------------
#
# Two rows right of a tall Load column. Row A: Calibrate | Score & cluster | Prune. Row B: Sample
# dense vs pruned | Compare | Save. Links that would cross a column run through reroutes in lanes
# no node occupies: the MODEL bus above row A, the pruned-MODEL and VAE lanes between the rows.
W = 270  # ordinary node width
WP = 230  # preview width
DIFF_HEIGHT = 154  # the difference image: the Compare group's bottom is the graph's (zoom >= 0.6)
ROW_A = 0  # top of row A's groups
ROW_B = 650  # top of row B's groups
LANE_TOP = ROW_A - 40  # the MODEL bus
LANE_MID = ROW_B - 25  # between the rows
X = {  # left edge of each column
    "load": 0,
    "cal": 340,
    "cal_out": 660,
    "score": 960,
    "cluster": 1240,
    "cluster_out": 1560,
    "apply": 1860,
    "apply_out": 2180,
    "ksampler": 340,
    "decode": 700,
    "images": 980,
    "metrics": 1260,
    "save": 1570,
    "save_out": 1890,
    "held_out": 2180,  # the Held-out Check, right of Save's outputs (with a prompt set)
}
TOP_A = ROW_A + GROUP_HEAD + 10  # title-bar top of a group's first node
TOP_B = ROW_B + GROUP_HEAD + 10

NOTES = {
    "load": "Loads the model to prune, its text encoders and VAE, and the prompt.\n\n"
    "Files: see properties / the README's 'Model files'. The same prompt and latent feed "
    "calibration and both samplers.",
    "calibrate": "Samples once, recording each layer's input energy. Matters: steps, prompt and "
    "latent size; save_name keeps the calibration for Load Calibration.",
    "score": "Score ranks weights (energy = DiT-Pruning). Cluster sets the comparison groups "
    "(default: layer) and plots one layer's rows.",
    "prune": "Masks a copy of the model (the input is unchanged). Matters: sparsity, pattern (2:4 "
    "for sparse kernels), layer families.",
    "sample": "Same seed, steps and prompt for both samplers, so the two images differ only by the pruning.",
    "compare": "PSNR and relative error of pruned vs dense; the difference image is amplified.",
    "save": "Writes models/diffusion_models/<prefix>_00001.safetensors and shows its size, bits per "
    "weight and the VRAM it needs.\n\n"
    "format compressed (here): about 56% of bf16 at 50%; open it with DiT-Pruning Load Pruned Model.\n"
    "format dense: as large as the source; opens in the stock Load Diffusion Model.",
}
SAVE_OUTPUTS = [("path", "STRING"), ("size", "STRING")]
SAVE_HELD_OUT_NOTE = (
    "\n\nHeld-out Check (right): 4 of the prompt set's held-out prompts and 4 calibrated ones, dense vs "
    "pruned from the same noise at 4 steps; held-out error well above seen means the masks fit "
    "their calibration prompts."
)


def _text_out(
    g: Graph, src: int, slot: int, x: int, y: int, title: str, height: int = 100, width: int = WP
) -> int:
    """A Preview Any showing a STRING output after a run."""
    node = g.add("PreviewAny", (x, y), [], [("source", "*")], [], title=title)
    g.place(node, x, y, width, height)
    g.link(src, slot, node, "source")
    return node


def _image_out(g: Graph, src: int, slot: int, x: int, y: int, title: str, height: int = 200) -> int:
    node = g.add("PreviewImage", (x, y), [], [("images", "IMAGE")], [], title=title)
    g.place(node, x, y, WP, height)
    g.link(src, slot, node, "images")
    return node


def pruning_chain(
    g: Graph,
    model: int,
    pos: int,
    neg: int,
    latent: int,
    *,
    cfg: float,
    plot_layer: str,
    prompt_set: bool = False,
) -> tuple[int, int]:
    """Calibrate -> Score -> Cluster -> Apply (row A); returns (Apply node, its MODEL reroute).
    With ``prompt_set``, a Prompt Set (the shipped prompts) feeds Calibrate."""
    # Calibrate: UNET's model output sits level with Calibrate's model input
    note = g.note((0, 0), W, 120, NOTES["calibrate"], "About: calibrate")
    g.place(note, X["cal"], TOP_A, W, 120)
    cal = g.add(
        "DitPruneCalibrate",
        (0, 0),
        [0, "fixed", 8, cfg, "euler", "simple", "log", ""],
        [
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
            ("calibration", "DITPRUNE_CALIBRATION"),
            *([("prompt_set", "DITPRUNE_PROMPTS")] if prompt_set else []),
        ],
        [("calibration", "DITPRUNE_CALIBRATION"), ("LATENT", "LATENT"), ("summary", "STRING")],
    )
    g.place(cal, X["cal"], TOP_A + 160, W)
    for src, name in ((model, "model"), (pos, "positive"), (neg, "negative"), (latent, "latent_image")):
        g.link(src, 0, cal, name)
    cal_y = g.nodes[cal - 1]["pos"][1]
    members = [note, cal]
    if prompt_set:  # the shipped prompt set, at the top of the output column (above the
        # calibration's link to Score), feeding Calibrate
        prompts = _prompt_set_node(g)
        _x, bottom = g.place(prompts, X["cal_out"], TOP_A, WP)
        g.named["prompt_set"] = prompts
        g.named["under_prompt_set"] = bottom + 20  # Calibrate's link to Score passes under it
        top_lane = LANE_TOP + 18  # between the MODEL bus and the groups
        _route(
            g,
            g.named["clip"],
            0,
            prompts,
            "clip",
            [
                (X["load"] + W + 27, _output_y(g, g.named["clip"], 0)),
                (X["load"] + W + 27, top_lane),
                (X["cal_out"] - 15, top_lane),
                (X["cal_out"] - 15, _input_y(g, prompts, "clip")),
            ],
        )
        back = top_lane - 6
        _route(
            g,
            prompts,
            0,
            cal,
            "prompt_set",
            [
                (X["cal_out"] + WP + 10, _output_y(g, prompts, 0)),
                (X["cal_out"] + WP + 10, back),
                (X["load"] + W + 33, back),
                (X["load"] + W + 33, _input_y(g, cal, "prompt_set")),
            ],
        )
        members.append(prompts)
    summary_top = cal_y + 40 if not prompt_set else g.named["under_prompt_set"] + 24
    cal_summary = _text_out(g, cal, 2, X["cal_out"], summary_top, "calibration summary", 140)
    g.group("2 · Calibrate", COLOURS["calibrate"], [*members, cal_summary])

    # Score level with Calibrate's calibration output; its saliency runs straight to Apply
    note3 = g.note((0, 0), WP, 120, NOTES["score"], "About: score & cluster")
    g.place(note3, X["score"], TOP_A, WP, 120)
    score = g.add(
        "DitPruneScoreSaliency",
        (0, 0),
        ["energy", 0.4, "none", 0.5],
        [("calibration", "DITPRUNE_CALIBRATION")],
        [("saliency", "DITPRUNE_SALIENCY")],
    )
    g.place(score, X["score"], cal_y - TITLE, WP)
    if prompt_set:  # under the Prompt Set, through the gap above the summary
        under = g.named["under_prompt_set"]
        out_y = _output_y(g, cal, 0)
        left, right = X["cal"] + W + 14, X["cal_out"] + WP + 24
        _route(
            g, cal, 0, score, "calibration", [(left, out_y), (left, under), (right, under), (right, out_y)]
        )
    else:
        g.link(cal, 0, score, "calibration")
    saliency_y = cal_y + 0.7 * SLOT
    # MODEL bus above row A, dropping into Cluster and Apply
    bus0 = g.reroute((X["cal"] - 35, LANE_TOP))
    bus1 = g.reroute((X["cluster"] - 25, LANE_TOP), bus0)
    bus2 = g.reroute((X["apply"] - 30, LANE_TOP), bus1)
    g.named["model_bus"] = bus2
    cluster = g.add(
        "DitPruneClusterWeights",
        (0, 0),
        ["layer", 0, 4, 0.5, 1.0, "row", 0, "fixed", plot_layer],
        [("model", "MODEL"), ("saliency", "DITPRUNE_SALIENCY")],
        [("clusters", "DITPRUNE_CLUSTERS"), ("plot", "IMAGE"), ("summary", "STRING")],
    )
    g.place(cluster, X["cluster"], int(saliency_y) + 30, W)
    g.link(model, 0, cluster, "model", via=bus1)
    g.link(score, 0, cluster, "saliency")
    cluster_y = g.nodes[cluster - 1]["pos"][1]
    plot = _image_out(
        g, cluster, 1, X["cluster_out"], TOP_A, "2-D weight space", int(saliency_y) - TOP_A - 60
    )
    cluster_summary = _text_out(g, cluster, 2, X["cluster_out"], cluster_y + 50, "cluster summary", 110)
    g.group("3 · Score & cluster", COLOURS["score"], [note3, score, cluster, plot, cluster_summary])

    apply = g.add(
        "DitPruneApplyPruning",
        (0, 0),
        [0.5, "unstructured", True, True, True, False, ""],
        [("model", "MODEL"), ("saliency", "DITPRUNE_SALIENCY"), ("clusters", "DITPRUNE_CLUSTERS")],
        [("MODEL", "MODEL"), ("report", "STRING"), ("sparsity per block", "IMAGE")],
    )
    g.place(apply, X["apply"], int(saliency_y - 1.7 * SLOT) - TITLE, W)
    g.link(model, 0, apply, "model", via=bus2)
    g.link(score, 0, apply, "saliency")
    g.link(cluster, 0, apply, "clusters")
    apply_y = g.nodes[apply - 1]["pos"][1]
    note4 = g.note((0, 0), W, 100, NOTES["prune"], "About: prune")
    g.place(note4, X["apply"], apply_y + 242 + 20, W, 110)
    chart = _image_out(g, apply, 2, X["apply_out"], TOP_A, "sparsity per block", 200)
    report = _text_out(g, apply, 1, X["apply_out"], TOP_A + 260, "pruning report", 200)
    g.group("4 · Prune", COLOURS["prune"], [apply, note4, chart, report])
    pruned_bus = g.reroute((X["apply_out"] - 25, LANE_MID))
    return apply, pruned_bus


def _ksampler(g: Graph, steps: int, cfg: float, label: str) -> int:
    """A KSampler (seed 42 fixed, Euler, simple) titled by what it samples."""
    return g.add(
        "KSampler",
        (0, 0),
        [42, "fixed", steps, cfg, "euler", "simple", 1.0],
        [
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
        ],
        [("LATENT", "LATENT")],
        title=f"KSampler ({label})",
    )


def _vae_decode(g: Graph, label: str) -> int:
    """A VAE Decode titled by what it decodes."""
    return g.add(
        "VAEDecode",
        (0, 0),
        [],
        [("samples", "LATENT"), ("vae", "VAE")],
        [("IMAGE", "IMAGE")],
        title=f"VAE Decode ({label})",
    )


def _compare_group(
    g: Graph,
    decoded: dict[str, int],
    pruned: str,
    images: list[int],
    columns: tuple[int, int],
    ks_ys: list[int],
    top: int,
    note: str,
    number: str,
) -> None:
    """The Compare group: the ``pruned`` and dense images, Compare between them, its metrics and
    difference image, and its note, in the images and metrics ``columns`` beside the samplers."""
    x_images, x_metrics = columns
    images.append(_image_out(g, decoded[pruned], 0, x_images, ks_ys[0] - TITLE, pruned, 220))
    compare = g.add(
        "DitPruneCompare",
        (0, 0),
        [4.0],
        [("dense", "IMAGE"), ("pruned", "IMAGE")],
        [("metrics", "STRING"), ("difference", "IMAGE")],
    )
    g.place(compare, x_images, ks_ys[0] + 220 + 10, WP)
    g.link(decoded["dense"], 0, compare, "dense")
    g.link(decoded[pruned], 0, compare, "pruned")
    images.append(_image_out(g, decoded["dense"], 0, x_images, ks_ys[1] - TITLE + 60, "dense", 200))
    compare_y = g.nodes[compare - 1]["pos"][1]
    metrics = _text_out(g, compare, 0, x_metrics, top, f"metrics ({pruned} vs dense)", 120)
    diff = _image_out(g, compare, 1, x_metrics, compare_y - TITLE + 20, "difference x4", DIFF_HEIGHT)
    about = g.note((0, 0), WP, 100, note, "About: compare")
    g.place(about, x_metrics, compare_y + 20 + DIFF_HEIGHT + 12, WP, 100)
    g.group(f"{number} · Compare", COLOURS["compare"], [*images, compare, metrics, diff, about])


def sample_compare_save(
    g: Graph,
    dense_model: int,
    pruned_model: int,
    pruned_bus: int,
    pos: int,
    neg: int,
    latent: int,
    vae: int,
    vae_slot: int,
    *,
    steps: int,
    cfg: float,
    prefix: str,
) -> None:
    """Row B: KSampler (pruned) above KSampler (dense), decode, images and Compare, Save."""
    save_bus = g.reroute((X["save"] - 30, LANE_MID), pruned_bus)
    ks_bus = g.reroute((X["ksampler"] - 35, LANE_MID), save_bus)
    vae_bus0 = g.reroute((X["load"] + W + 30, LANE_MID + 12))
    vae_bus1 = g.reroute((X["decode"] - 40, LANE_MID + 12), vae_bus0)
    decoded, samplers, decoders, images = {}, [], [], []
    y = TOP_B
    for label, model in (("pruned", pruned_model), ("dense", dense_model)):
        ks = _ksampler(g, steps, cfg, label)
        g.place(ks, X["ksampler"], y, W)
        g.link(model, 0, ks, "model", via=ks_bus if label == "pruned" else None)
        for src, name in ((pos, "positive"), (neg, "negative"), (latent, "latent_image")):
            g.link(src, 0, ks, name)
        dec = _vae_decode(g, label)
        g.place(dec, X["decode"], y, 200)
        g.link(ks, 0, dec, "samples")
        g.link(vae, vae_slot, dec, "vae", via=vae_bus1)
        samplers.append(ks)
        decoders.append(dec)
        decoded[label] = dec
        y += TITLE + 262 + 20  # the samplers close together: the graph opens at a 0.6 zoom
    note5 = g.note((0, 0), 200, 150, NOTES["sample"], "About: sample")
    g.place(note5, X["decode"], TOP_B + 130, 200, 150)
    g.group("5 · Sample dense vs pruned", COLOURS["sample"], [*samplers, *decoders, note5])

    ks_ys = [g.nodes[s - 1]["pos"][1] for s in samplers]
    _compare_group(
        g, decoded, "pruned", images, (X["images"], X["metrics"]), ks_ys, TOP_B, NOTES["compare"], "6"
    )

    save = g.add(
        "DitPruneSavePrunedModel",
        (0, 0),
        [prefix, "compressed", "keep dtype", "auto", "keep"],
        [("model", "MODEL")],
        SAVE_OUTPUTS,
    )
    _x, save_bottom = g.place(save, X["save"], TOP_B, W)
    g.link(pruned_model, 0, save, "model", via=save_bus)
    path = _text_out(g, save, 0, X["save_out"], TOP_B, "saved file", 120)
    size = _text_out(g, save, 1, X["save_out"], TOP_B + TITLE + 120 + 24, "size, bits per weight, VRAM", 170)
    if "prompt_set" not in g.named:
        note7 = g.note((0, 0), W, 170, NOTES["save"], "About: save")
        g.place(note7, X["save"], save_bottom + 24, W, 170)
        g.group("7 · Save", COLOURS["save"], [save, path, size, note7])
        return
    # with a prompt set: the held-out check joins the group, in a column right of Save's outputs,
    # its report and grid under them
    note7 = g.note((0, 0), W, 170, NOTES["save"] + SAVE_HELD_OUT_NOTE, "About: save & held-out check")
    g.place(note7, X["save"], save_bottom + 24, W, 170)
    check = _held_out_node(g, cfg)
    _x, check_bottom = g.place(check, X["held_out"], TOP_B, WP)
    report = g.add("PreviewAny", (0, 0), [], [("source", "*")], [], title="held-out check report")
    _x, report_bottom = g.place(report, X["held_out"], check_bottom + 24, WP, 88)
    grid = g.add("PreviewImage", (0, 0), [], [("images", "IMAGE")], [], title="held-out grid")
    g.place(grid, X["held_out"], report_bottom + 24, WP, 130)
    # both outputs return under the check and run down its left margin (Graph.wrap's route)
    cx, cy, cw, ch = g.box(check)
    for slot, node, name, offset in ((0, report, "source", 0), (1, grid, "images", 5)):
        _route(
            g,
            check,
            slot,
            node,
            name,
            [
                (cx + cw + 8 + offset, cy + ch + 8 + offset),
                (cx - 6 - offset, cy + ch + 8 + offset),
                (cx - 6 - offset, _input_y(g, node, name)),
            ],
        )
    lanes = {  # input -> (source, slot, reroute it continues from or None, the lane it runs down)
        "model": (dense_model, 0, g.named["model_bus"]),
        "pruned_model": (pruned_model, 0, pruned_bus),
        "prompt_set": (g.named["prompt_set"], 0, None),
        "negative": (neg, 0, None),
        "latent_image": (latent, 0, None),
        "vae": (vae, vae_slot, None),
    }
    for i, (name, (src, slot, parent)) in enumerate(lanes.items()):
        down = X["held_out"] - 36 + 5 * i
        if parent is not None:  # off a bus, straight down the lane beside the check
            top = g.reroute((down, g.reroutes[parent - 1]["pos"][1]), parent)
            g.link(src, slot, check, name, via=g.reroute((down, _input_y(g, check, name)), top))
            continue
        lane_y = LANE_MID + 10 + 3 * i  # between the rows, under the VAE lane
        start_x = (
            X["cal_out"] + WP + 16 if name == "prompt_set" else X["load"] + W + 14 + 4 * i
        )  # out of the Prompt Set, or down the gap beside the Load column
        _route(
            g,
            src,
            slot,
            check,
            name,
            [
                (start_x, _output_y(g, src, slot)),
                (start_x, lane_y),
                (down, lane_y),
                (down, _input_y(g, check, name)),
            ],
        )
    g.group("7 · Save & held-out check", COLOURS["save"], [save, path, size, note7, check, report, grid])


def _load_column(g: Graph, nodes: list[tuple[int, int]], text: str = NOTES["load"]) -> list[int]:
    """Stack (node, height) in the Load column under its note; returns the members."""
    note = g.note((0, 0), W, 100, text, "About: load")
    _x, y = g.place(note, X["load"], TOP_A, W, 100)
    members = [note]
    y += 24
    for node, height in nodes:
        _x, bottom = g.place(node, X["load"], y, W, height)
        y = bottom + 24
        members.append(node)
    return members


def _flux_loaders(g: Graph, note: str = NOTES["load"]) -> tuple[int, int, int, int, int]:
    """FLUX.1-dev's loaders and prompt in the Load column: (model, positive, negative, latent, vae)."""
    unet = g.add("UNETLoader", (0, 0), ["flux1-dev.safetensors", "default"], [], [("MODEL", "MODEL")])
    clip = g.add(
        "DualCLIPLoader",
        (0, 0),
        ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"],
        [],
        [("CLIP", "CLIP")],
    )
    text = g.add(
        "CLIPTextEncode",
        (0, 0),
        ["a red fox in fresh snow, golden hour, detailed fur"],
        [("clip", "CLIP")],
        [("CONDITIONING", "CONDITIONING")],
        title="positive",
    )
    pos = g.add(
        "FluxGuidance",
        (0, 0),
        [3.5],
        [("conditioning", "CONDITIONING")],
        [("CONDITIONING", "CONDITIONING")],
    )
    neg = g.add(
        "CLIPTextEncode",
        (0, 0),
        [""],
        [("clip", "CLIP")],
        [("CONDITIONING", "CONDITIONING")],
        title="negative (unused at cfg 1)",
    )
    latent = g.add("EmptySD3LatentImage", (0, 0), [512, 512, 1], [], [("LATENT", "LATENT")])
    vae = g.add("VAELoader", (0, 0), ["ae.safetensors"], [], [("VAE", "VAE")])
    g.named["clip"] = clip
    members = _load_column(
        g, [(unet, 82), (clip, 130), (text, 110), (pos, 58), (neg, 88), (latent, 106), (vae, 58)], note
    )
    margin = g.wrap(clip, 0, text, "clip")
    g.wrap(clip, 0, neg, "clip", via=margin)
    g.wrap(text, 0, pos, "conditioning")
    g.group("1 · Load", COLOURS["load"], members)
    return unet, pos, neg, latent, vae


def flux_dev() -> dict[str, Any]:
    g = Graph()
    unet, pos, neg, latent, vae = _flux_loaders(g)
    apply, pruned_bus = pruning_chain(
        g, unet, pos, neg, latent, cfg=1.0, plot_layer="single_blocks.0.linear1", prompt_set=True
    )
    sample_compare_save(
        g, unet, apply, pruned_bus, pos, neg, latent, vae, 0, steps=20, cfg=1.0, prefix="ditprune/flux1-dev"
    )
    g.fit_view()
    return g.to_json()


def _sd35_loaders(g: Graph, note: str = NOTES["load"]) -> tuple[int, int, int, int]:
    """SD3.5 Large's checkpoint, text encoders and prompt: (checkpoint, positive, negative, latent);
    the checkpoint's slot 0 is the MODEL, slot 2 the VAE."""
    ckpt = g.add(
        "CheckpointLoaderSimple",
        (0, 0),
        ["sd3.5_large.safetensors"],
        [],
        [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    )
    clip = g.add(
        "TripleCLIPLoader",
        (0, 0),
        ["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"],
        [],
        [("CLIP", "CLIP")],
    )
    pos = g.add(
        "CLIPTextEncode",
        (0, 0),
        ["a lighthouse on a cliff at dusk, oil painting"],
        [("clip", "CLIP")],
        [("CONDITIONING", "CONDITIONING")],
        title="positive",
    )
    neg = g.add(
        "CLIPTextEncode",
        (0, 0),
        ["blurry, low quality"],
        [("clip", "CLIP")],
        [("CONDITIONING", "CONDITIONING")],
        title="negative",
    )
    latent = g.add("EmptySD3LatentImage", (0, 0), [1024, 1024, 1], [], [("LATENT", "LATENT")])
    g.named["clip"] = clip
    members = _load_column(g, [(ckpt, 98), (clip, 106), (pos, 120), (neg, 100), (latent, 106)], note)
    margin = g.wrap(clip, 0, pos, "clip")
    g.wrap(clip, 0, neg, "clip", via=margin)
    g.group("1 · Load", COLOURS["load"], members)
    return ckpt, pos, neg, latent


def sd35() -> dict[str, Any]:
    g = Graph()
    ckpt, pos, neg, latent = _sd35_loaders(g)
    apply, pruned_bus = pruning_chain(
        g, ckpt, pos, neg, latent, cfg=4.5, plot_layer="joint_blocks.0.x_block.attn.qkv", prompt_set=True
    )
    sample_compare_save(
        g,
        ckpt,
        apply,
        pruned_bus,
        pos,
        neg,
        latent,
        ckpt,
        2,
        steps=28,
        cfg=4.5,
        prefix="ditprune/sd3.5-large",
    )
    g.fit_view()
    return g.to_json()


def wan21_t2v() -> dict[str, Any]:
    """Wan 2.1 T2V 14B: the same flow on video. Calibration runs on the same 33-frame latent the
    samplers use (9 latent frames; docs/bench/video_calibration.md says how many frames and steps are
    enough); the decoded frames are compared as an image batch."""
    g = Graph()
    unet = g.add(
        "UNETLoader", (0, 0), ["wan2.1_t2v_14B_bf16.safetensors", "default"], [], [("MODEL", "MODEL")]
    )
    shifted = g.add(
        "ModelSamplingSD3", (0, 0), [8.0], [("model", "MODEL")], [("MODEL", "MODEL")], title="shift 8"
    )
    clip = g.add(
        "CLIPLoader",
        (0, 0),
        ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"],
        [],
        [("CLIP", "CLIP")],
    )
    pos = g.add(
        "CLIPTextEncode",
        (0, 0),
        ["a red fox trotting through fresh snow at golden hour, the camera tracking beside it"],
        [("clip", "CLIP")],
        [("CONDITIONING", "CONDITIONING")],
        title="positive",
    )
    neg = g.add(
        "CLIPTextEncode",
        (0, 0),
        ["blurry, static, low quality, worst quality, jpeg artifacts, deformed, extra limbs"],
        [("clip", "CLIP")],
        [("CONDITIONING", "CONDITIONING")],
        title="negative",
    )
    latent = g.add(
        "EmptyHunyuanLatentVideo", (0, 0), [832, 480, 33, 1], [], [("LATENT", "LATENT")], title="33 frames"
    )
    vae = g.add("VAELoader", (0, 0), ["wan_2.1_vae.safetensors"], [], [("VAE", "VAE")])
    members = _load_column(
        g,
        [(unet, 82), (shifted, 58), (clip, 106), (pos, 120), (neg, 120), (latent, 130), (vae, 58)],
    )
    g.wrap(unet, 0, shifted, "model")
    margin = g.wrap(clip, 0, pos, "clip")
    g.wrap(clip, 0, neg, "clip", via=margin)
    g.group("1 · Load", COLOURS["load"], members)
    apply, pruned_bus = pruning_chain(g, shifted, pos, neg, latent, cfg=6.0, plot_layer="blocks.0.ffn.0")
    sample_compare_save(
        g,
        shifted,
        apply,
        pruned_bus,
        pos,
        neg,
        latent,
        vae,
        0,
        steps=30,
        cfg=6.0,
        prefix="ditprune/wan2.1-t2v-14b",
    )
    g.fit_view()
    return g.to_json()


# --- the reconstruction variants (FLUX.1-dev, SD3.5, and FLUX.1-dev per GPU) ---------------------
#
# Load column, then row A: Prune and Reconstruct with its note and report beside it, and Save (with
# its path and size) on the right; row B: the reconstructed and the dense model sampled from the
# same seed, decoded, and compared (PSNR, relative error, difference image), as in the plain
# workflows. The reconstructed MODEL reaches its sampler along the column's left margin
# (Graph.wrap) and Save over the MODEL bus above row A; the VAE runs in the lane between the rows.
WR = 300  # Prune and Reconstruct's width
RECON_STEPS = 8  # its sampler steps per pass: the plain workflows' calibration steps
WSIDE = 440  # the note and report beside it
XR = {
    "recon": 340,
    "side": 710,  # 70 from Prune and Reconstruct: the wrap's drop along its right edge bulges ~40
    "save": 1200,
    "save_out": 1500,
    "decode": 640,
    "images": 890,
    "metrics": 1150,
}

RECONSTRUCT_NOTES = {
    "load": "Loads the model, its text encoders and VAE, and the prompt.\n\nFiles: see properties / "
    "the README's 'Model files'. The same prompt and latent feed the reconstruction's sampler runs "
    "and both samplers below.",
    "reconstruct": "{setting}Prunes a copy of the model (the input is unchanged) and updates the weights "
    "it keeps, so that each layer's output on these prompts changes as little as possible.\n\n"
    "Cost: the sampler runs once per pass for every calibration prompt of the prompt set (103 here, "
    "{steps} steps each at this latent size{cfg_note}; fewer prompts in the set cost less). {model} "
    "needs {total} GiB of Gram matrices: {passes_8} passes at an 8 GiB budget, {passes_4} at 4 "
    "(memory_budget_gb 0: a quarter of the free memory, at most 8). Block refinement is off (it "
    "did not hold out); on, it adds a sampler run per block ({blocks}). The node shows its phase.",
    "sample": "Both from seed 42, {steps} steps, the same prompt: the pictures differ only by the "
    "pruning. Add Save Image to keep them.",
    "compare": "PSNR and relative error of reconstructed vs dense; the difference is amplified x4.",
    "save": "Writes models/diffusion_models/<prefix>_00001.safetensors (never over a file) and shows "
    "its size, bits per weight and the VRAM it needs.\n\n"
    "format compressed (here){size}: open it with DiT-Pruning Load Pruned Model.\n"
    "format dense: as large as the source; opens in the stock Load Diffusion Model.",
}


def reconstruct_chain(
    g: Graph,
    model: int,
    pos: int,
    neg: int,
    latent: int,
    vae: int,
    vae_slot: int,
    *,
    cfg: float,
    steps: int,
    notes: dict[str, str],
    prefix: str,
    setting: dict[str, Any],
) -> tuple[int, int]:
    """Groups 2-5: Prune and Reconstruct -> sample it and the dense model, compare / save it.
    Returns (Prune and Reconstruct, the reroute on the MODEL bus its output reaches Save through).

    ``setting``: ``sparsity``, ``value_bits`` ("none" or "8" / "4" / "3") and Save's ``values`` and
    ``remainder``."""
    recon = g.add(
        "DitPrunePruneAndReconstruct",
        (0, 0),
        # the calibration settings of the plain workflow's Calibrate; budget 0 (auto)
        [
            *(0, "fixed", RECON_STEPS, cfg, "euler", "simple", "log"),  # seed .. timestep_weighting
            *("energy", setting["sparsity"], "unstructured", True, True, True, False, ""),  # metric ..
            0.0,  # memory_budget_gb
            setting["value_bits"],  # the kept values' codes, chosen jointly (Save stores them exactly)
            0,  # block_refine_steps: the default, off (it did not hold out: docs/bench/generalisation.md)
            setting.get("target_file_gb", 0.0),  # the size target (0: the widgets above)
            setting.get("value_group", "128"),  # values a scale covers (the size target sets it too)
        ],
        [
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
            ("saliency", "DITPRUNE_SALIENCY"),
            ("clusters", "DITPRUNE_CLUSTERS"),
            ("prompt_set", "DITPRUNE_PROMPTS"),
        ],
        [("MODEL", "MODEL"), ("report", "STRING")],
    )
    _x, recon_bottom = g.place(recon, XR["recon"], TOP_A, WR)
    for src, name in ((model, "model"), (pos, "positive"), (neg, "negative"), (latent, "latent_image")):
        g.link(src, 0, recon, name)
    note = g.note((0, 0), WSIDE, 200, notes["reconstruct"], "About: prune and reconstruct")
    _x, note_bottom = g.place(note, XR["side"], TOP_A, WSIDE, 200)
    report = _text_out(
        g,
        recon,
        1,
        XR["side"],
        note_bottom + 24,
        "reconstruction report",
        max(150, recon_bottom - note_bottom - 54),
        WSIDE,
    )
    row_a_bottom = max(recon_bottom, note_bottom + 24 + TITLE + g.nodes[report - 1]["size"][1])

    save = g.add(
        "DitPruneSavePrunedModel",
        (0, 0),
        [prefix, "compressed", setting["values"], "auto", setting["remainder"]],
        [("model", "MODEL")],
        SAVE_OUTPUTS,
    )
    _x, save_bottom = g.place(save, XR["save"], TOP_A, W)
    bus = g.reroute((XR["side"] - 20, LANE_TOP))
    save_via = g.reroute((XR["save"] - 30, LANE_TOP), bus)
    g.link(recon, 0, save, "model", via=save_via)
    path = _text_out(g, save, 0, XR["save_out"], TOP_A, "saved file", 110)
    size = _text_out(g, save, 1, XR["save_out"], TOP_A + TITLE + 110 + 24, "size, bits per weight, VRAM", 200)
    note5 = g.note((0, 0), W, 200, notes["save"], "About: save")
    _x, note5_bottom = g.place(note5, XR["save"], save_bottom + 24, W, 200)
    g.group("2 · Prune and reconstruct", COLOURS["reconstruct"], [recon, note, report])
    row_a_bottom = max(row_a_bottom, note5_bottom, TOP_A + 2 * TITLE + 110 + 24 + 200)

    row_b = row_a_bottom + PAD + 26
    top_b = row_b + GROUP_HEAD + 10
    lane = row_b - 20  # between the rows
    vae_bus = g.reroute((XR["decode"] - 30, lane), g.reroute((X["load"] + W + 30, lane)))
    decoded, samplers, decoders, ks_ys = {}, [], [], []
    y = top_b
    for label, source in (("reconstructed", recon), ("dense", model)):
        ks = _ksampler(g, steps, cfg, label)
        g.place(ks, XR["recon"], y, W)
        if label == "reconstructed":
            g.wrap(recon, 0, ks, "model")
        else:  # down the gap between the Load column and the rows, then into the sampler
            sx, sy, sw, _sh = g.box(source)
            start = g.reroute((sx + sw + 30, sy + TITLE + int(0.7 * SLOT)))
            drop = g.reroute((sx + sw + 30, y + TITLE + int(0.7 * SLOT)), start)
            g.link(source, 0, ks, "model", via=drop)
        for src, name in ((pos, "positive"), (neg, "negative"), (latent, "latent_image")):
            g.link(src, 0, ks, name)
        dec = _vae_decode(g, label)
        g.place(dec, XR["decode"], y, 200)
        g.link(ks, 0, dec, "samples")
        if label == "reconstructed":
            g.link(vae, vae_slot, dec, "vae", via=vae_bus)
        else:  # down the gap left of the decoders, to the dense decoder's vae input
            drop = g.reroute((XR["decode"] - 18, y + TITLE + int(1.7 * SLOT)), vae_bus)
            g.link(vae, vae_slot, dec, "vae", via=drop)
        samplers.append(ks)
        decoders.append(dec)
        decoded[label] = dec
        ks_ys.append(g.nodes[ks - 1]["pos"][1])
        y += TITLE + 262 + 20  # the samplers close together: the graph opens at a 0.6 zoom
    note3 = g.note((0, 0), 200, 150, notes["sample"], "About: sample")
    g.place(note3, XR["decode"], top_b + TITLE + 46 + 30, 200, 150)
    g.group("3 · Sample dense vs reconstructed", COLOURS["sample"], [*samplers, *decoders, note3])

    _compare_group(
        g, decoded, "reconstructed", [], (XR["images"], XR["metrics"]), ks_ys, top_b, notes["compare"], "4"
    )
    g.group("5 · Save", COLOURS["save"], [save, path, size, note5])
    return recon, save_via


# --- the prompt set and the held-out check (the reconstruction workflows) ---------------------------
#
# A column group right of Save: the Prompt Set (the shipped 103 + 16 prompts, encoded with the
# workflow's text encoder) feeding Prune and Reconstruct over a lane just above the groups, and the
# Held-out Check of the dense vs the reconstructed model, its report and image grid. The links from
# the Load column run down the gap beside it, along lanes under the rows and up the gap left of
# this group; the reconstructed MODEL branches off the MODEL bus.
XH = {"lane": 1752, "col1": 1800, "col2": 2116}  # col2 clear of the lane right of col1 (link corners bulge)
WH = 300  # the grid and report width
HELD_OUT_NOTE = (
    "Prompt Set: the shipped prompts (103 calibrated on, 16 held out; written for ditprune), encoded "
    "with this workflow's text encoder. Prune and Reconstruct samples every calibration prompt in "
    "every pass: its cost is sampler runs x prompts x steps (its report says how many).\n\n"
    "Held-out Check: 4 held-out and 4 calibration prompts, dense vs reconstructed from the same noise "
    "at 4 steps. Held-out error well above seen (ratio 2 and more): the result fitted its prompts."
)


def _prompt_set_node(g: Graph) -> int:
    """A Prompt Set of the shipped prompts (103 calibration + 16 held out)."""
    return g.add(
        "DitPrunePromptSet",
        (0, 0),
        ["(shipped default set)", "", 256, 0.0, 1, ""],  # ..., seeds_per_prompt, sizes (the latent's)
        [("clip", "CLIP")],
        [("prompt_set", "DITPRUNE_PROMPTS")],
        title="prompt set (calibration + held-out)",
    )


def _held_out_node(g: Graph, cfg: float) -> int:
    """A Held-out Check: 4 held-out and 4 calibration prompts at 4 steps, seed 0."""
    return g.add(
        "DitPruneHeldOutCheck",
        (0, 0),
        [0, "fixed", 4, cfg, "euler", "simple", 4, 4],
        [
            ("model", "MODEL"),
            ("pruned_model", "MODEL"),
            ("prompt_set", "DITPRUNE_PROMPTS"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
            ("vae", "VAE"),
        ],
        [("report", "STRING"), ("grid", "IMAGE")],
    )


def _output_y(g: Graph, node: int, slot: int) -> int:
    return int(g.nodes[node - 1]["pos"][1] + (slot + 0.7) * SLOT)


def _input_y(g: Graph, node: int, name: str) -> int:
    slot = next(i for i, inp in enumerate(g.nodes[node - 1]["inputs"]) if inp["name"] == name)
    return int(g.nodes[node - 1]["pos"][1] + (slot + 0.7) * SLOT)


def _route(g: Graph, src: int, slot: int, dst: int, name: str, points: list[tuple[int, int]]) -> None:
    """Link through a chain of reroutes at ``points``."""
    parent = None
    for point in points:
        parent = g.reroute(point, parent)
    g.link(src, slot, dst, name, via=parent)


def held_out_group(
    g: Graph,
    *,
    dense: int,
    recon: int,
    recon_via: int,
    neg: int,
    latent: int,
    vae: int,
    vae_slot: int,
    cfg: float,
) -> None:
    """Group 6: Prompt Set -> Prune and Reconstruct, and the Held-out Check with its report and grid."""
    bottom = max(grp["bounding"][1] + grp["bounding"][3] for grp in g.groups)
    prompts = _prompt_set_node(g)
    _x, y = g.place(prompts, XH["col1"], TOP_A, W)
    check = _held_out_node(g, cfg)
    _x, _bottom = g.place(check, XH["col1"], y + 40, W)
    check_y = g.nodes[check - 1]["pos"][1] - TITLE
    note = g.note((0, 0), WH, 200, HELD_OUT_NOTE, "About: prompt set & held-out check")
    _x, note_bottom = g.place(note, XH["col2"], TOP_A, WH, 200)
    report = _text_out(
        g, check, 0, XH["col2"], max(check_y, note_bottom + 24), "held-out check report", 200, WH
    )
    _x, report_bottom = g.place(report, XH["col2"], max(check_y, note_bottom + 24), WH, 200)
    grid = g.add("PreviewImage", (0, 0), [], [("images", "IMAGE")], [], title="held-out grid")
    g.place(grid, XH["col2"], report_bottom + 24, WH, 320)
    lane = XH["col1"] + W + 12
    _route(g, check, 1, grid, "images", [(lane, _output_y(g, check, 1)), (lane, _input_y(g, grid, "images"))])
    g.wrap(prompts, 0, check, "prompt_set")
    # the set to Prune and Reconstruct: up the gap right of the Prompt Set, left along a lane just
    # above the groups, down the gap beside the Load column
    top_lane = LANE_TOP + 18
    out_x = XH["col1"] + W + 22
    _route(
        g,
        prompts,
        0,
        recon,
        "prompt_set",
        [
            (out_x, _output_y(g, prompts, 0)),
            (out_x, top_lane),
            (X["load"] + W + 48, top_lane),
            (X["load"] + W + 48, _input_y(g, recon, "prompt_set")),
        ],
    )
    # the reconstructed MODEL: off the MODEL bus, down the gap left of this group
    drop = g.reroute((XH["lane"] + 8, LANE_TOP), recon_via)
    g.link(
        recon,
        0,
        check,
        "pruned_model",
        via=g.reroute((XH["lane"] + 8, _input_y(g, check, "pruned_model")), drop),
    )
    # from the Load column: down the gap beside it, along the lanes under the rows, up to the check
    sources = [
        (dense, 0, check, "model"),
        (neg, 0, check, "negative"),
        (latent, 0, check, "latent_image"),
        (vae, vae_slot, check, "vae"),
        (g.named["clip"], 0, prompts, "clip"),
    ]
    for i, (src, slot, dst, name) in enumerate(sources):
        gap_x = X["load"] + W + 18 + 5 * i
        lane_y = bottom + 6 + 4 * i
        right_x = XH["lane"] + 4 * (i if i < 2 else i + 1)
        _route(
            g,
            src,
            slot,
            dst,
            name,
            [
                (gap_x, _output_y(g, src, slot)),
                (gap_x, lane_y),
                (right_x, lane_y),
                (right_x, _input_y(g, dst, name)),
            ],
        )
    g.group("6 · Prompt set & held-out check", COLOURS["held_out"], [note, prompts, check, report, grid])


def _reconstruct_notes(
    model: str,
    *,
    steps: int,
    cfg: float,
    gram_gib: tuple[float, int, int],
    size: str,
    setting: str = "",
) -> dict[str, str]:
    """The notes of a reconstruction variant; ``gram_gib`` = (total GiB of Grams, passes at 8, at 4);
    ``setting``: what this workflow's settings make (the per-GPU ones), first in its note."""
    total, passes_8, passes_4 = gram_gib
    cfg_note = "" if cfg == 1.0 else f"; cfg {cfg} evaluates the model twice a step"
    return {
        **RECONSTRUCT_NOTES,
        "reconstruct": RECONSTRUCT_NOTES["reconstruct"].format(
            setting=setting,
            steps=RECON_STEPS,
            cfg_note=cfg_note,
            model=model,
            total=total,
            passes_8=passes_8,
            passes_4=passes_4,
            blocks=BLOCKS[model],
        ),
        "sample": RECONSTRUCT_NOTES["sample"].format(steps=steps),
        "save": RECONSTRUCT_NOTES["save"].format(size=size),
    }


# Grams of the layers pruned by default (attention, MLP, FLUX's fused single-block layers), in GiB,
# and the passes they take at 8 and 4 GiB: ditprune_core.reconstruct.plan_groups over the full-size
# layers (tests/comfyui/test_workflows.py recomputes them)
GRAM_GIB: dict[str, tuple[float, int, int]] = {"flux1-dev": (60.1, 8, 17), "sd3.5-large": (31.4, 4, 9)}
#: GiB of Gram matrices a size target's GPTQ remainder (``remainder_bits``) adds: the modulation layers
#: (the rest of the blocks' Linear layers) of full-size FLUX.1-dev (the same test recomputes it)
REMAINDER_GRAM_GIB = {"flux1-dev": 2.7}
#: transformer blocks, each refined with one more sampler run (19 double + 38 single; 38 joint)
BLOCKS = {"FLUX.1-dev": 57, "SD3.5 Large": 38}
#: the unquantised reconstruction: values in the model's dtype, the rest as it is
#: Save Pruned Model's values / remainder choice that takes them from Prune and Reconstruct's size target
FROM_TARGET = "size target"
PLAIN_SETTING = {"sparsity": 0.5, "value_bits": "none", "values": "keep dtype", "remainder": "keep"}
#: the size–fidelity table's choice per GPU, written by ``python -m bench tiers``
TIERS_JSON = Path(__file__).resolve().parent.parent / "docs" / "bench" / "vram_tiers.json"


def tiers() -> list[dict[str, Any]]:
    """The tiers whose verdict is a ditprune file (docs/bench/vram_tiers.json)."""
    return [t for t in json.loads(TIERS_JSON.read_text())["tiers"] if t["verdict"] == "ditprune"]


#: ditprune_core.config.UPGRADE_CHOICES, which this script does not import (it needs no torch; a test
#: checks they agree): Prune and Reconstruct's ``upgrade`` widget -> the table's ``upgrade_layers``
UPGRADE_CHOICES: dict[str, str | None] = {
    "none": None,
    "attention int4": r"(img|txt)_attn\.qkv|img_attn\.proj",
}


def upgrade_choice(upgrade_layers: str | None) -> str:
    """Prune and Reconstruct's ``upgrade`` widget value for a table's ``upgrade_layers``."""
    return next(name for name, regex in UPGRADE_CHOICES.items() if regex == upgrade_layers)


def tier_setting(tier: dict[str, Any]) -> dict[str, Any]:
    """Prune and Reconstruct's and Save's widgets for a tier, read from the table's choice: the
    size target is the card's file budget (the node picks the same setting from the same table), the
    three widgets it replaces show that setting, and Save takes values and remainder from it."""
    bits = tier["value_bits"]
    return {
        "sparsity": tier["sparsity"],
        "value_bits": "none" if bits is None else str(bits),
        "value_group": str(tier["value_group"]),
        "upgrade": upgrade_choice(tier.get("upgrade_layers")),
        "values": FROM_TARGET,
        "remainder": FROM_TARGET,
        "target_file_gb": tier["target_file_gb"],
    }


def _errors(errors: dict[str, float]) -> str:
    return " / ".join(f"{e:.4f}" for e in errors.values())


def tier_text(tier: dict[str, Any]) -> str:
    """What a tier's workflow makes, costs and gives, from the table (its note's first paragraph)."""
    bits = "values in the model's dtype" if tier["value_bits"] is None else f"{tier['value_bits']}-bit values"
    if tier["value_bits"] is not None and tier["value_group"] != 128:
        bits += f" in groups of {tier['value_group']}"
    if tier.get("upgrade_layers") is not None:
        bits += f" ({upgrade_choice(tier['upgrade_layers'])}: those attention layers at 4 bits)"
    kind = f"{tier['sparsity']:.0%} sparsity" if tier["sparsity"] > 0 else "no pruning (quantise only)"
    models = "/".join(m.removeprefix("miniflux-").upper() for m in tier["errors"])
    return (
        f"For {tier['vram_gib']} GB GPUs: target_file_gb {tier['target_file_gb']} picks {kind}, {bits}, "
        f"remainder {tier['remainder']}. File {tier['file_gb']:.2f} GB, "
        f"VRAM {tier['vram_gb']:.2f} GB ({tier['needs_gb']:.2f} GB with ComfyUI's reserve at 1024²). "
        f"Held-out error (MiniFlux {models}): {_errors(tier['errors'])}; ComfyUI's fp8 "
        f"({tier['fp8_gb']:.1f} GB, {'fits' if tier['fp8_fits'] else 'does not fit'}): "
        f"{_errors(tier['fp8_errors'])}.{_remainder_text(tier)}\n\n"
    )


def _remainder_text(tier: dict[str, Any]) -> str:
    """A tier whose remainder is quantised by GPTQ while pruning (``remainder_bits``) says so."""
    if tier.get("remainder_bits") is None:
        return ""
    return (
        f" The remainder (modulation) is quantised to {tier['remainder_bits']} bits by GPTQ in the same "
        f"passes ({REMAINDER_GRAM_GIB['flux1-dev']} GiB more Gram matrices), not rounded when saved."
    )


def flux_dev_reconstruct(tier: dict[str, Any] | None = None) -> dict[str, Any]:
    setting = PLAIN_SETTING if tier is None else tier_setting(tier)
    size = (
        ", about 16.3 GB for FLUX.1-dev at 50 %, more than ComfyUI's fp8 (11.9 GB): for smaller files "
        "use the per-GPU workflows ditprune_flux1_dev_<N>gb"
        if tier is None
        else f", about {tier['file_gb']:.2f} GB"
    )
    notes = _reconstruct_notes(
        "FLUX.1-dev",
        steps=20,
        cfg=1.0,
        gram_gib=GRAM_GIB["flux1-dev"],
        size=size,
        setting="" if tier is None else tier_text(tier),
    )
    g = Graph()
    unet, pos, neg, latent, vae = _flux_loaders(g, notes["load"])
    prefix = (
        "ditprune/flux1-dev-reconstructed" if tier is None else f"ditprune/flux1-dev-{tier['vram_gib']}gb"
    )
    recon, recon_via = reconstruct_chain(
        g, unet, pos, neg, latent, vae, 0, cfg=1.0, steps=20, notes=notes, prefix=prefix, setting=setting
    )
    held_out_group(
        g, dense=unet, recon=recon, recon_via=recon_via, neg=neg, latent=latent, vae=vae, vae_slot=0, cfg=1.0
    )
    g.fit_view()
    return g.to_json()


def sd35_reconstruct() -> dict[str, Any]:
    notes = _reconstruct_notes("SD3.5 Large", steps=28, cfg=4.5, gram_gib=GRAM_GIB["sd3.5-large"], size="")
    g = Graph()
    ckpt, pos, neg, latent = _sd35_loaders(g, notes["load"])
    recon, recon_via = reconstruct_chain(
        g,
        ckpt,
        pos,
        neg,
        latent,
        ckpt,
        2,
        cfg=4.5,
        steps=28,
        notes=notes,
        prefix="ditprune/sd3.5-large-reconstructed",
        setting=PLAIN_SETTING,
    )
    held_out_group(
        g, dense=ckpt, recon=recon, recon_via=recon_via, neg=neg, latent=latent, vae=ckpt, vae_slot=2, cfg=4.5
    )
    g.fit_view()
    return g.to_json()


def _tier_builder(tier: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    return lambda: flux_dev_reconstruct(tier)


WORKFLOWS: dict[str, Callable[[], dict[str, Any]]] = {
    "ditprune_flux1_dev.json": flux_dev,
    "ditprune_sd35.json": sd35,
    "ditprune_wan21_t2v.json": wan21_t2v,
    "ditprune_flux1_dev_reconstruct.json": flux_dev_reconstruct,
    "ditprune_sd35_reconstruct.json": sd35_reconstruct,
    **{f"ditprune_flux1_dev_{t['vram_gib']}gb.json": _tier_builder(t) for t in tiers()},
}


def card_text(name: str) -> tuple[str, list[str]]:
    """The template thumbnail's title and lines: what the workflow makes (ComfyUI's template list
    shows the file name as its title, so the card says what it is)."""
    fixed = {
        "ditprune_flux1_dev.json": (
            "FLUX.1-dev: prune (mask only)",
            ["calibrate, score, prune 50%,", "compare dense vs pruned (PSNR),", "save compressed"],
        ),
        "ditprune_sd35.json": (
            "SD3.5 Large: prune (mask only)",
            ["calibrate, score, prune 50%,", "compare dense vs pruned (PSNR),", "save compressed"],
        ),
        "ditprune_wan21_t2v.json": (
            "Wan 2.1 T2V 14B: prune (mask only)",
            ["calibrate on a 33-frame clip,", "prune 50%, compare the frames,", "save compressed"],
        ),
        "ditprune_flux1_dev_reconstruct.json": (
            "FLUX.1-dev: prune + reconstruct",
            ["50%, values in bf16: 16.3 GB", "(larger than ComfyUI's fp8:", "see the per-GPU workflows)"],
        ),
        "ditprune_sd35_reconstruct.json": (
            "SD3.5 Large: prune + reconstruct",
            ["50%, values in bf16,", "compare dense vs reconstructed,", "save compressed"],
        ),
    }
    if name in fixed:
        return fixed[name]
    tier = next(t for t in tiers() if name == f"ditprune_flux1_dev_{t['vram_gib']}gb.json")
    bits = "bf16" if tier["value_bits"] is None else f"int{tier['value_bits']}"
    kind = f"{tier['sparsity']:.0%} pruned" if tier["sparsity"] > 0 else "dense (no pruning)"
    return (
        f"FLUX.1-dev for {tier['vram_gib']} GB GPUs",
        [
            f"{kind}, {bits} values, rest {tier['remainder']}",
            f"file {tier['file_gb']:.2f} GB, VRAM {tier['vram_gb']:.2f} GB",
            f"held-out error {tier['mean_error']:.4f} (MiniFlux)",
        ],
    )


def write_card(path: Path, title: str, lines: list[str]) -> None:
    """A 400x300 JPEG title card: the template list's thumbnail (Pillow; no screenshot needed)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (400, 300), "#1f2430")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 400, 8), fill=COLOURS["reconstruct"] if "GPU" in title else COLOURS["load"])
    big, small = ImageFont.load_default(size=25), ImageFont.load_default(size=19)
    y = 30
    for part in _wrap(title, 26):
        draw.text((20, y), part, fill="white", font=big)
        y += 34
    y += 14
    for line in lines:
        draw.text((20, y), line, fill="#c8d0e0", font=small)
        y += 28
    draw.text((20, 266), "ditprune workflow", fill="#7f8aa0", font=small)
    image.save(path, format="JPEG", quality=90)


def _wrap(text: str, width: int) -> list[str]:
    out, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*out, line]


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    for name, build in WORKFLOWS.items():
        path = here / name
        if path.exists() and "--force" not in argv:
            print(f"{path} exists; pass --force to regenerate it", file=sys.stderr)
            return 1
        path.write_text(json.dumps(build(), indent=1) + "\n")
        write_card(path.with_suffix(".jpg"), *card_text(name))
        print(f"wrote {path} and its thumbnail")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
