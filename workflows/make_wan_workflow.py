"""Writes the Wan 2.1 T2V 14B example workflow (ComfyUI UI format) next to this file.

    python workflows/make_wan_workflow.py       # refuses to overwrite; --force to regenerate

load -> calibrate on a short clip (17 frames = 5 latent frames, 8 steps; docs/bench/video_calibration.md
says why that is enough) -> score -> apply -> KSampler (pruned) beside KSampler (dense) on the full
81-frame video -> decode -> compare -> save the pruned model and both videos.
tests/comfyui/test_workflows.py checks it against the live node schemas like the FLUX one.
Kept apart from make_workflows.py (FLUX, SD3.5); it reuses that file's Graph.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_workflows import Graph

NAME = "ditprune_wan21_t2v.json"
WIDTH, HEIGHT, FRAMES, CALIBRATION_FRAMES = 832, 480, 81, 17
STEPS, CALIBRATION_STEPS, CFG, SHIFT = 30, 8, 6.0, 8.0
NEGATIVE = "blurry, static, low quality, worst quality, jpeg artifacts, deformed, extra limbs"


def wan21_t2v() -> dict[str, Any]:
    g = Graph()
    unet = g.add(
        "UNETLoader", (0, 40), ["wan2.1_t2v_14B_bf16.safetensors", "default"], [], [("MODEL", "MODEL")]
    )
    shifted = g.add(
        "ModelSamplingSD3", (0, 180), [SHIFT], [("model", "MODEL")], [("MODEL", "MODEL")], title="shift 8"
    )
    g.link(unet, 0, shifted, "model")
    clip = g.add(
        "CLIPLoader",
        (0, 300),
        ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"],
        [],
        [("CLIP", "CLIP")],
    )
    vae = g.add("VAELoader", (0, 460), ["wan_2.1_vae.safetensors"], [], [("VAE", "VAE")])
    pos = g.add(
        "CLIPTextEncode",
        (0, 580),
        ["a red fox trotting through fresh snow at golden hour, the camera tracking beside it"],
        [("clip", "CLIP")],
        [("CONDITIONING", "CONDITIONING")],
        title="positive",
    )
    neg = g.add(
        "CLIPTextEncode",
        (0, 800),
        [NEGATIVE],
        [("clip", "CLIP")],
        [("CONDITIONING", "CONDITIONING")],
        title="negative",
    )
    for node in (pos, neg):
        g.link(clip, 0, node, "clip")
    short = g.add(
        "EmptyHunyuanLatentVideo",
        (0, 1020),
        [WIDTH, HEIGHT, CALIBRATION_FRAMES, 1],
        [],
        [("LATENT", "LATENT")],
        title="calibration clip (17 frames)",
    )
    video = g.add(
        "EmptyHunyuanLatentVideo",
        (0, 1200),
        [WIDTH, HEIGHT, FRAMES, 1],
        [],
        [("LATENT", "LATENT")],
        title="video (81 frames)",
    )

    cal = g.add(
        "DitPruneCalibrate",
        (400, 40),
        [0, "fixed", CALIBRATION_STEPS, CFG, "uni_pc", "simple", "log", "wan21_t2v_14b"],
        [
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
            ("calibration", "DITPRUNE_CALIBRATION"),
        ],
        [("calibration", "DITPRUNE_CALIBRATION"), ("LATENT", "LATENT"), ("summary", "STRING")],
    )
    for src, name in ((shifted, "model"), (pos, "positive"), (neg, "negative"), (short, "latent_image")):
        g.link(src, 0, cal, name)
    score = g.add(
        "DitPruneScoreSaliency",
        (400, 360),
        ["energy", 0.4, "none", 0.5],
        [("calibration", "DITPRUNE_CALIBRATION")],
        [("saliency", "DITPRUNE_SALIENCY")],
    )
    g.link(cal, 0, score, "calibration")
    apply = g.add(
        "DitPruneApplyPruning",
        (760, 40),
        [0.5, "unstructured", True, True, True, False, ""],
        [("model", "MODEL"), ("saliency", "DITPRUNE_SALIENCY"), ("clusters", "DITPRUNE_CLUSTERS")],
        [("MODEL", "MODEL"), ("report", "STRING"), ("sparsity per block", "IMAGE")],
    )
    g.link(shifted, 0, apply, "model")
    g.link(score, 0, apply, "saliency")
    chart = g.add("PreviewImage", (760, 420), [], [("images", "IMAGE")], [], title="sparsity per block")
    g.link(apply, 2, chart, "images")

    decoded = {}
    for row, (label, model) in enumerate((("pruned", apply), ("dense", shifted))):
        ks = g.add(
            "KSampler",
            (1150, 40 + 300 * row),
            [42, "fixed", STEPS, CFG, "uni_pc", "simple", 1.0],
            [
                ("model", "MODEL"),
                ("positive", "CONDITIONING"),
                ("negative", "CONDITIONING"),
                ("latent_image", "LATENT"),
            ],
            [("LATENT", "LATENT")],
            title=f"KSampler ({label})",
        )
        for src, name in ((model, "model"), (pos, "positive"), (neg, "negative"), (video, "latent_image")):
            g.link(src, 0, ks, name)
        dec = g.add(
            "VAEDecode",
            (1500, 40 + 300 * row),
            [],
            [("samples", "LATENT"), ("vae", "VAE")],
            [("IMAGE", "IMAGE")],
        )
        g.link(ks, 0, dec, "samples")
        g.link(vae, 0, dec, "vae")
        clip_node = g.add(
            "CreateVideo",
            (1800, 40 + 300 * row),
            [16.0],
            [("images", "IMAGE"), ("audio", "AUDIO")],
            [("VIDEO", "VIDEO")],
            title=f"{label} video, 16 fps",
        )
        g.link(dec, 0, clip_node, "images")
        out = g.add(
            "SaveVideo",
            (2100, 40 + 300 * row),
            [f"ditprune/wan21_{label}", "auto", "auto"],
            [("video", "VIDEO")],
            [],
        )
        g.link(clip_node, 0, out, "video")
        decoded[label] = dec
    compare = g.add(
        "DitPruneCompare",
        (1500, 640),
        [4.0],
        [("dense", "IMAGE"), ("pruned", "IMAGE")],
        [("metrics", "STRING"), ("difference", "IMAGE")],
    )
    g.link(decoded["dense"], 0, compare, "dense")
    g.link(decoded["pruned"], 0, compare, "pruned")
    diff = g.add("PreviewImage", (1800, 640), [], [("images", "IMAGE")], [], title="difference x4")
    g.link(compare, 1, diff, "images")
    save = g.add(
        "DitPruneSavePrunedModel",
        (1150, 640),
        ["ditprune/wan2.1-t2v-14b", "compressed", "keep dtype"],
        [("model", "MODEL")],
        [("path", "STRING")],
    )
    g.link(apply, 0, save, "model")
    return g.to_json()


def main(argv: list[str]) -> int:
    path = Path(__file__).resolve().parent / NAME
    if path.exists() and "--force" not in argv:
        print(f"{path} exists; pass --force to regenerate it", file=sys.stderr)
        return 1
    path.write_text(json.dumps(wan21_t2v(), indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
