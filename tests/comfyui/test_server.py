"""A real ComfyUI server on 127.0.0.1 loads the pack and runs an API-format workflow."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from conftest import REPO, Comfy
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import random_state_dict, sd3_shapes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_server_queues_an_api_workflow(comfy: Comfy, tmp_path: Path) -> None:
    base = tmp_path / "base"
    for sub in ("custom_nodes", "user", "models/diffusion_models"):
        (base / sub).mkdir(parents=True)
    (base / "custom_nodes" / "ditprune").symlink_to(REPO, target_is_directory=True)
    save_file(
        random_state_dict(sd3_shapes(), seed=9), str(base / "models/diffusion_models/tiny_sd3.safetensors")
    )
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--base-directory",
            str(base),
            "--disable-auto-launch",
            "--database-url",
            f"sqlite:///{base}/user/comfyui.db",
        ],
        cwd=comfy.root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                info = _get(f"{url}/object_info/DitPruneApplyPruning")
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "server did not start in 120 s"
                time.sleep(0.5)
        assert info["DitPruneApplyPruning"]["category"] == "DiT-Pruning"
        templates = _get(f"{url}/workflow_templates")
        assert sorted(templates["ditprune"]) == ["ditprune_flux1_dev", "ditprune_sd35", "ditprune_wan21_t2v"]

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
        while not (history := _get(f"{url}/history/{prompt_id}")):
            assert time.monotonic() < deadline, "workflow did not finish in 120 s"
            time.sleep(0.5)
        status = history[prompt_id]["status"]
        assert status["status_str"] == "success", status
        saved = base / "models/diffusion_models/served_00001.safetensors"
        with safe_open(str(saved), framework="pt") as f:
            weight = f.get_tensor("joint_blocks.0.x_block.attn.qkv.weight")
        groups = weight.reshape(weight.shape[0], -1, 4)
        assert torch.equal((groups != 0).sum(-1), torch.full(groups.shape[:2], 2))  # exactly 2 of every 4
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
