"""Checkpoint I/O: the one validated safetensors reader/writer, NeMo checkpoint checks, atomic output.

Importing this package is cheap (stdlib only; torch is imported when a tensor is read), so CLIs
validate their inputs here before any heavy import. Every failure is a `CheckpointError` whose
one-line message names the file or tensor and the fix.
"""

from .atomic import atomic_output_dir, check_output, remove_stale_temp_dirs
from .errors import CheckpointError, check_values, read_json_object
from .nemo import check_nemo_dir
from .safetensors import (SafetensorsCheckpoint, SafetensorsFile, SafetensorsStreamWriter, check_hf_dir,
                          copy_safetensors_tensors, parse_size)

__all__ = [
    "CheckpointError",
    "SafetensorsCheckpoint",
    "SafetensorsFile",
    "SafetensorsStreamWriter",
    "atomic_output_dir",
    "check_hf_dir",
    "check_nemo_dir",
    "check_output",
    "check_values",
    "copy_safetensors_tensors",
    "parse_size",
    "read_json_object",
    "remove_stale_temp_dirs",
]
