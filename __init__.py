"""ditprune: prune diffusion transformers (FLUX.1, SD3/SD3.5) inside ComfyUI.

ComfyUI loads this folder as a package and calls ``comfy_entrypoint`` (V3 node API). pytest may
import this file as a loose module; the guard keeps that harmless.
"""

if __package__:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
