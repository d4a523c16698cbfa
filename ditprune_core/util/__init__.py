"""Helpers the stages share: exact selection, bit packing, atomic files, streamed safetensors, pictures,
row-block memory policy and image metrics. Nothing here knows about pruning stages."""
