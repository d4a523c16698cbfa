"""ditprune: prune diffusion transformers (FLUX.1, SD3/SD3.5) inside ComfyUI.

ComfyUI loads this folder as a package and calls ``comfy_entrypoint`` (V3 node API). Test runners
may import this file too (as a loose module, or as a package outside ComfyUI): the guards keep that
harmless, while inside ComfyUI every import error still surfaces.
"""

if __package__:
    try:
        from .nodes import comfy_entrypoint
    except ModuleNotFoundError as exc:  # imported outside ComfyUI, e.g. by pytest collecting the repo
        if exc.name not in ("comfy", "comfy_api", "folder_paths"):
            raise
    else:
        __all__ = ["comfy_entrypoint"]
