"""Runtime for compressed checkpoints: pruned weights stay compressed on the device.

``PackedOps`` is a ComfyUI operations class whose Linear keeps a pruned weight as its compressed
pieces (buffers, so they move with the model and count in its memory size) and decompresses it for
each forward, on the input's device: in the checkpoint's dtype, then cast to the input's, so that
it computes with exactly the weight a densified load holds. Quantised layers (int8/int4/int3
codes, and the fp8 or int8 dense remainder) stay compressed the same way, as ComfyUI-GGUF keeps its
blocks: each is dequantised right before its matmul (:func:`~ditprune_core.layouts.runtime_pieces`
lays bitmask codes out for a fast decode). Patches (LoRA, masks) still apply:
``PackedModelPatcher`` hands them to the layer instead of baking them into a weight that does not
exist densely, and lowvram patches arrive through the layer's ``weight_function`` list as usual.
With ``sparse_kernels``, 2:4 layers run with torch's semi-structured sparse kernels where they
exist (CUDA, fp16/bf16); elsewhere they fall back to the dense decompression.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, cast

import comfy.lora
import comfy.model_patcher
import comfy.ops
import comfy.weight_adapter
import torch
from torch import nn

from ..ditprune_core.layouts import PIECES
from ..ditprune_core.runtime import RuntimePlan, decode_runtime, runtime_pieces, runtime_plan

log = logging.getLogger("ditprune")


class PackedLinear(comfy.ops.manual_cast.Linear):
    packed_pieces: tuple[str, ...] = ()
    sparse_kernels = False
    #: the dtype patches (LoRA) are applied in: float32, or None for the compute dtype ("target")
    patch_dtype: torch.dtype | None = torch.float32

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if key + ".shape" not in state_dict:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        rows, cols = (int(x) for x in state_dict[key + ".shape"].tolist())
        if (rows, cols) != (self.out_features, self.in_features):
            raise ValueError(
                f"compressed weight {key!r} is {rows}x{cols} but the model's layer is "
                f"{self.out_features}x{self.in_features}: the checkpoint does not match the detected model"
            )
        pieces: dict[str, torch.Tensor] = {
            p: state_dict.pop(f"{key}.{p}") for p in PIECES if f"{key}.{p}" in state_dict
        }
        placeholder = state_dict.pop(key, None)  # empty, or the loader's meta tensor of the true dtype
        #: the checkpoint's dtype of this weight (None: unknown, decode in the input's dtype)
        self.packed_dtype = (
            placeholder.dtype if placeholder is not None and placeholder.is_floating_point() else None
        )
        names = []
        # shape and spec are read on the host every forward: kept on the CPU, they cost no device sync
        self._host_pieces: dict[str, torch.Tensor] = {
            p: pieces.pop(p) for p in ("shape", "qspec") if p in pieces
        }
        held = runtime_pieces({**pieces, **self._host_pieces}, repr(key))
        #: what the decode reads on the host, as plain ints (no device sync, nothing to trace)
        self.packed_plan: RuntimePlan = runtime_plan(held, repr(key))
        for piece, tensor in held.items():
            if piece not in self._host_pieces:
                self.register_buffer(f"packed_{piece}", tensor, persistent=True)
                names.append(piece)
        self.packed_pieces = tuple(names)
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.ditprune_patches: tuple[str, list[Any]] | None = None
        self._sparse_cache: tuple[Any, Any] | None = None
        bias = state_dict.pop(prefix + "bias", None)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    @property
    def is_packed(self) -> bool:
        return bool(self.packed_pieces)

    def dense_weight(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) weight in ``dtype`` on ``device``: each value rounded to the checkpoint's
        dtype, written once in ``dtype``."""
        pieces = {p: getattr(self, f"packed_{p}").to(device, non_blocking=True) for p in self.packed_pieces}
        return decode_runtime(pieces, self.packed_plan, self.packed_dtype or dtype, out_dtype=dtype)

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = input
        if not self.is_packed:
            return super().forward(x, *args, **kwargs)
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        for f in self.bias_function:
            bias = f(bias)
        if (
            self.sparse_kernels
            and "nm_values" in self.packed_pieces
            and not self.weight_function
            and self.ditprune_patches is None
        ):
            out = self._semi_structured(x, bias)
            if out is not None:
                return out
        weight = self.dense_weight(x.device, x.dtype)
        for f in self.weight_function:  # lowvram patches (LowVramPatch) take the decompressed weight
            weight = f(weight)
        if self.ditprune_patches is not None:
            key, patches = self.ditprune_patches
            if self.patch_dtype is None:  # in the compute dtype, as ComfyUI's lowvram patches
                weight = comfy.lora.calculate_weight(patches, weight, key, intermediate_dtype=x.dtype)
            else:
                patched = comfy.lora.calculate_weight(patches, weight.to(self.patch_dtype), key)
                weight = patched.to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)

    def _semi_structured(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
            return None
        try:
            if self._sparse_cache is None or self._sparse_cache[0] != (x.device, x.dtype):
                sparse = torch.sparse.to_sparse_semi_structured(self.dense_weight(x.device, x.dtype))
                self._sparse_cache = ((x.device, x.dtype), sparse)
            return torch.nn.functional.linear(x, self._sparse_cache[1], bias)
        except (RuntimeError, NotImplementedError, AttributeError) as exc:
            log.warning("ditprune: 2:4 sparse kernels unavailable (%s); using dense decompression", exc)
            self.sparse_kernels = False
            return None


class PackedOps(comfy.ops.manual_cast):
    Linear = PackedLinear


class PackedModelPatcher(comfy.model_patcher.ModelPatcher):
    """Patches on packed layers are applied in their forward, not baked into a dense weight.

    ``patch_on_device``: the patches' tensors are moved to the load device when they are handed to
    the layer, so that no forward copies them (ComfyUI-GGUF's option of the same name).
    """

    patch_on_device = False

    def clone(self, *args: Any, **kwargs: Any) -> Any:
        n = super().clone(*args, **kwargs)
        n.patch_on_device = self.patch_on_device
        return n

    def _packed(self, key: str) -> PackedLinear | None:
        module_name, _, attr = key.rpartition(".")
        if attr != "weight":
            return None
        try:
            module = self.model.get_submodule(module_name)
        except AttributeError:
            return None
        return module if isinstance(module, PackedLinear) and module.is_packed else None

    def patch_weight_to_device(self, key: str, device_to: Any = None, inplace_update: bool = False) -> None:
        module = self._packed(key)
        if module is None:
            return super().patch_weight_to_device(key, device_to, inplace_update)
        if key not in self.patches:
            module.ditprune_patches = None
            return None
        patches = self.patches[key]
        if self.patch_on_device:
            patches = _to_device(patches, self.load_device)
        module.ditprune_patches = (key, patches)
        return None

    def unpatch_model(self, device_to: Any = None, unpatch_weights: bool = True) -> Any:
        if unpatch_weights:
            for module in self.model.modules():
                if isinstance(module, PackedLinear) and module.is_packed:
                    module.ditprune_patches = None
        return super().unpatch_model(device_to, unpatch_weights)


def _to_device(item: Any, device: torch.device) -> Any:
    """A patch list with every tensor in it moved to ``device`` (the structure kept)."""
    if isinstance(item, torch.Tensor):
        return item.to(device, non_blocking=True)
    if isinstance(item, tuple):
        return tuple(_to_device(x, device) for x in item)
    if isinstance(item, list):
        return [_to_device(x, device) for x in item]
    if isinstance(item, comfy.weight_adapter.WeightAdapterBase):
        moved = copy.copy(item)
        moved.weights = _to_device(item.weights, device)
        return moved
    return item


def make_packed(
    model: comfy.model_patcher.ModelPatcher,
    sparse_kernels: bool,
    *,
    patch_on_device: bool = False,
    patch_dtype: torch.dtype | None = torch.float32,
) -> comfy.model_patcher.ModelPatcher:
    """Turn the patcher of a model built with :class:`PackedOps` into a :class:`PackedModelPatcher`.

    Args:
        sparse_kernels: 2:4 layers through torch's semi-structured kernels where they exist.
        patch_on_device: patches moved to the load device once, not every forward.
        patch_dtype: patches applied in float32 (default), or None: in the compute dtype.
    """
    model.__class__ = PackedModelPatcher
    packed = cast(PackedModelPatcher, model)
    packed.patch_on_device = patch_on_device
    for module in packed.model.modules():
        if isinstance(module, PackedLinear) and module.is_packed:
            module.sparse_kernels = sparse_kernels
            module.patch_dtype = patch_dtype
    return packed
