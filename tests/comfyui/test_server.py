"""A real ComfyUI server on 127.0.0.1 loads the pack and runs an API-format workflow."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import torch
from browser import comfy_server, get_json
from conftest import Comfy
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import random_state_dict, sd3_shapes


def test_server_queues_an_api_workflow(comfy: Comfy, tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "models/diffusion_models").mkdir(parents=True)
    save_file(
        random_state_dict(sd3_shapes(), seed=9), str(base / "models/diffusion_models/tiny_sd3.safetensors")
    )
    with comfy_server(comfy.root, base, start_seconds=120) as url:
        info = get_json(f"{url}/object_info/DitPruneApplyPruning")
        assert info["DitPruneApplyPruning"]["category"] == "DiT-Pruning"
        templates = get_json(f"{url}/workflow_templates")
        assert sorted(templates["ditprune"]) == [
            "ditprune_flux1_dev",
            "ditprune_flux1_dev_12gb",
            "ditprune_flux1_dev_6gb",
            "ditprune_flux1_dev_8gb",
            "ditprune_flux1_dev_reconstruct",
            "ditprune_sd35",
            "ditprune_sd35_reconstruct",
            "ditprune_wan21_t2v",
        ]

        prompt = {
            "1": {
                "class_type": "UNETLoader",
                "inputs": {"unet_name": "tiny_sd3.safetensors", "weight_dtype": "default"},
            },
            "2": {
                "class_type": "DitPruneScoreSaliency",
                "inputs": {"metric": "magnitude", "balance": 0.4, "normalize": "none", "ria_power": 0.5},
            },
            "3": {
                "class_type": "DitPruneApplyPruning",
                "inputs": {
                    "model": ["1", 0],
                    "saliency": ["2", 0],
                    "sparsity": 0.5,
                    "pattern": "2:4",
                    "attention": True,
                    "mlp": True,
                    "single_fused": True,
                    "modulation": False,
                    "layer_regex": "",
                },
            },
            "4": {
                "class_type": "DitPruneSavePrunedModel",
                "inputs": {
                    "model": ["3", 0],
                    "filename_prefix": "served",
                    "format": "dense",
                    "values": "keep dtype",
                },
            },
        }
        request = urllib.request.Request(
            f"{url}/prompt",
            data=json.dumps({"prompt": prompt}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            prompt_id = json.loads(r.read())["prompt_id"]
        deadline = time.monotonic() + 120
        while not (history := get_json(f"{url}/history/{prompt_id}")):
            assert time.monotonic() < deadline, "workflow did not finish in 120 s"
            time.sleep(0.5)
        status = history[prompt_id]["status"]
        assert status["status_str"] == "success", status
        saved = base / "models/diffusion_models/served_00001.safetensors"
        with safe_open(str(saved), framework="pt") as f:
            weight = f.get_tensor("joint_blocks.0.x_block.attn.qkv.weight")
        groups = weight.reshape(weight.shape[0], -1, 4)
        assert torch.equal((groups != 0).sum(-1), torch.full(groups.shape[:2], 2))  # exactly 2 of every 4
