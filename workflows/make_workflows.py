"""Writes the example workflows (ComfyUI UI format) next to this file.

    python workflows/make_workflows.py          # refuses to overwrite; --force to regenerate

load -> calibrate -> score -> cluster -> apply -> KSampler (pruned) beside KSampler (dense) ->
decode -> compare -> save, for FLUX.1-dev and SD3.5. tests/comfyui/test_workflows.py checks every
node type, link and widget count against the live node schemas.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


class Graph:
    def __init__(self) -> None:
        self.nodes: list[dict[str, Any]] = []
        self.links: list[list[Any]] = []

    def add(
        self,
        node_type: str,
        pos: tuple[int, int],
        widgets: list[Any],
        inputs: list[tuple[str, str]],
        outputs: list[tuple[str, str]],
        title: str | None = None,
    ) -> int:
        node_id = len(self.nodes) + 1
        node: dict[str, Any] = {
            "id": node_id,
            "type": node_type,
            "pos": list(pos),
            "size": [320, 60 + 24 * (len(widgets) + len(inputs))],
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
        self.nodes.append(node)
        return node_id

    def link(self, src: int, src_slot: int, dst: int, input_name: str) -> None:
        link_id = len(self.links) + 1
        source, target = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, inp in enumerate(target["inputs"]) if inp["name"] == input_name)
        link_type = source["outputs"][src_slot]["type"]
        target["inputs"][slot]["link"] = link_id
        source["outputs"][src_slot]["links"].append(link_id)
        self.links.append([link_id, src, src_slot, dst, slot, link_type])

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
        self.arrange()
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ditprune": "example"},
            "version": 0.4,
        }


def pruning_chain(
    g: Graph, model: int, pos: int, neg: int, latent: int, *, steps: int, cfg: float, plot_layer: str, x: int
) -> int:
    """Calibrate -> Score -> Cluster -> Apply; returns the Apply node id."""
    cal = g.add(
        "DitPruneCalibrate",
        (x, 40),
        [0, "fixed", 8, cfg, "euler", "simple", "log", ""],
        [
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
            ("calibration", "DITPRUNE_CALIBRATION"),
        ],
        [("calibration", "DITPRUNE_CALIBRATION"), ("LATENT", "LATENT"), ("summary", "STRING")],
    )
    for src, name in ((model, "model"), (pos, "positive"), (neg, "negative"), (latent, "latent_image")):
        g.link(src, 0, cal, name)
    score = g.add(
        "DitPruneScoreSaliency",
        (x, 360),
        ["energy", 0.4, "none", 0.5],
        [("calibration", "DITPRUNE_CALIBRATION")],
        [("saliency", "DITPRUNE_SALIENCY")],
    )
    g.link(cal, 0, score, "calibration")
    cluster = g.add(
        "DitPruneClusterWeights",
        (x + 360, 40),
        ["layer", 0, 4, 0.5, 1.0, "row", 0, "fixed", plot_layer],
        [("model", "MODEL"), ("saliency", "DITPRUNE_SALIENCY")],
        [("clusters", "DITPRUNE_CLUSTERS"), ("plot", "IMAGE"), ("summary", "STRING")],
    )
    g.link(model, 0, cluster, "model")
    g.link(score, 0, cluster, "saliency")
    plot = g.add("PreviewImage", (x + 360, 420), [], [("images", "IMAGE")], [], title="2-D weight space")
    g.link(cluster, 1, plot, "images")
    apply = g.add(
        "DitPruneApplyPruning",
        (x + 720, 40),
        [0.5, "unstructured", True, True, True, False, ""],
        [("model", "MODEL"), ("saliency", "DITPRUNE_SALIENCY"), ("clusters", "DITPRUNE_CLUSTERS")],
        [("MODEL", "MODEL"), ("report", "STRING"), ("sparsity per block", "IMAGE")],
    )
    g.link(model, 0, apply, "model")
    g.link(score, 0, apply, "saliency")
    g.link(cluster, 0, apply, "clusters")
    chart = g.add("PreviewImage", (x + 720, 420), [], [("images", "IMAGE")], [], title="sparsity per block")
    g.link(apply, 2, chart, "images")
    return apply


def sample_compare_save(
    g: Graph,
    dense_model: int,
    pruned_model: int,
    pos: int,
    neg: int,
    latent: int,
    vae: int,
    *,
    steps: int,
    cfg: float,
    prefix: str,
    x: int,
) -> None:
    decoded = {}
    for row, (label, model) in enumerate((("pruned", pruned_model), ("dense", dense_model))):
        ks = g.add(
            "KSampler",
            (x, 40 + 300 * row),
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
        for src, name in ((model, "model"), (pos, "positive"), (neg, "negative"), (latent, "latent_image")):
            g.link(src, 0, ks, name)
        dec = g.add(
            "VAEDecode",
            (x + 340, 40 + 300 * row),
            [],
            [("samples", "LATENT"), ("vae", "VAE")],
            [("IMAGE", "IMAGE")],
        )
        g.link(ks, 0, dec, "samples")
        g.link(vae, 0 if g.nodes[vae - 1]["type"] == "VAELoader" else 2, dec, "vae")
        preview = g.add("PreviewImage", (x + 600, 40 + 300 * row), [], [("images", "IMAGE")], [], title=label)
        g.link(dec, 0, preview, "images")
        decoded[label] = dec
    compare = g.add(
        "DitPruneCompare",
        (x + 340, 640),
        [4.0],
        [("dense", "IMAGE"), ("pruned", "IMAGE")],
        [("metrics", "STRING"), ("difference", "IMAGE")],
    )
    g.link(decoded["dense"], 0, compare, "dense")
    g.link(decoded["pruned"], 0, compare, "pruned")
    diff = g.add("PreviewImage", (x + 600, 640), [], [("images", "IMAGE")], [], title="difference x4")
    g.link(compare, 1, diff, "images")
    save = g.add(
        "DitPruneSavePrunedModel",
        (x, 640),
        [prefix, "compressed", "keep dtype", "auto"],
        [("model", "MODEL")],
        [("path", "STRING")],
    )
    g.link(pruned_model, 0, save, "model")


def flux_dev() -> dict[str, Any]:
    g = Graph()
    unet = g.add("UNETLoader", (0, 40), ["flux1-dev.safetensors", "default"], [], [("MODEL", "MODEL")])
    clip = g.add(
        "DualCLIPLoader",
        (0, 200),
        ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"],
        [],
        [("CLIP", "CLIP")],
    )
    vae = g.add("VAELoader", (0, 380), ["ae.safetensors"], [], [("VAE", "VAE")])
    text = g.add(
        "CLIPTextEncode",
        (0, 500),
        ["a red fox in fresh snow, golden hour, detailed fur"],
        [("clip", "CLIP")],
        [("CONDITIONING", "CONDITIONING")],
        title="positive",
    )
    g.link(clip, 0, text, "clip")
    pos = g.add(
        "FluxGuidance",
        (0, 720),
        [3.5],
        [("conditioning", "CONDITIONING")],
        [("CONDITIONING", "CONDITIONING")],
    )
    g.link(text, 0, pos, "conditioning")
    neg = g.add(
        "CLIPTextEncode",
        (0, 840),
        [""],
        [("clip", "CLIP")],
        [("CONDITIONING", "CONDITIONING")],
        title="negative (unused at cfg 1)",
    )
    g.link(clip, 0, neg, "clip")
    latent = g.add("EmptySD3LatentImage", (0, 980), [512, 512, 1], [], [("LATENT", "LATENT")])
    apply = pruning_chain(
        g, unet, pos, neg, latent, steps=8, cfg=1.0, plot_layer="single_blocks.0.linear1", x=400
    )
    sample_compare_save(
        g, unet, apply, pos, neg, latent, vae, steps=20, cfg=1.0, prefix="ditprune/flux1-dev", x=1500
    )
    return g.to_json()


def sd35() -> dict[str, Any]:
    g = Graph()
    ckpt = g.add(
        "CheckpointLoaderSimple",
        (0, 40),
        ["sd3.5_large.safetensors"],
        [],
        [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    )
    clip = g.add(
        "TripleCLIPLoader",
        (0, 220),
        ["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"],
        [],
        [("CLIP", "CLIP")],
    )
    pos = g.add(
        "CLIPTextEncode",
        (0, 420),
        ["a lighthouse on a cliff at dusk, oil painting"],
        [("clip", "CLIP")],
        [("CONDITIONING", "CONDITIONING")],
        title="positive",
    )
    g.link(clip, 0, pos, "clip")
    neg = g.add(
        "CLIPTextEncode",
        (0, 640),
        ["blurry, low quality"],
        [("clip", "CLIP")],
        [("CONDITIONING", "CONDITIONING")],
        title="negative",
    )
    g.link(clip, 0, neg, "clip")
    latent = g.add("EmptySD3LatentImage", (0, 860), [1024, 1024, 1], [], [("LATENT", "LATENT")])
    apply = pruning_chain(
        g, ckpt, pos, neg, latent, steps=8, cfg=4.5, plot_layer="joint_blocks.0.x_block.attn.qkv", x=400
    )
    sample_compare_save(
        g, ckpt, apply, pos, neg, latent, ckpt, steps=28, cfg=4.5, prefix="ditprune/sd3.5-large", x=1500
    )
    return g.to_json()


WORKFLOWS = {"ditprune_flux1_dev.json": flux_dev, "ditprune_sd35.json": sd35}


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    for name, build in WORKFLOWS.items():
        path = here / name
        if path.exists() and "--force" not in argv:
            print(f"{path} exists; pass --force to regenerate it", file=sys.stderr)
            return 1
        path.write_text(json.dumps(build(), indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
