"""HF <-> Megatron parameter mappings (families as data, one engine), safetensors and torch_dist I/O."""

from .convert import convert_hf_to_megatron, convert_megatron_to_hf, megatron_process_group
from .dist_ckpt import MARKER, load_megatron_checkpoint, read_marker, save_megatron_checkpoint
from .hf_export import export_hf_checkpoint
from .mapping import (FAMILY_MAPPINGS, check_hf_tensors, expected_hf_shapes, export_hf_weights,
                      load_hf_weights_into_model, mappings_for)
from .safetensors_io import SafetensorsReader, ShardedSafetensorsWriter
from .torch_dist_reader import MegatronCheckpointReader

__all__ = [
    "FAMILY_MAPPINGS", "MARKER", "MegatronCheckpointReader", "SafetensorsReader", "ShardedSafetensorsWriter",
    "check_hf_tensors", "convert_hf_to_megatron", "convert_megatron_to_hf", "expected_hf_shapes", "export_hf_checkpoint",
    "export_hf_weights", "load_hf_weights_into_model", "load_megatron_checkpoint", "mappings_for",
    "megatron_process_group", "read_marker", "save_megatron_checkpoint",
]
