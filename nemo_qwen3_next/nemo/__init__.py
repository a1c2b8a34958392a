"""NeMo 2 glue for Qwen3-Next (the core `nemo_qwen3_next` never imports NeMo).

* `Qwen3NextNeMoConfig` (NeMo `GPTConfig` + every Qwen3-Next field) and presets
* `Qwen3NextModel` (`llm.GPTModel`) with `hf` importer / exporter connectors
* `convert_hf_to_nemo`, `convert_nemo_to_hf`: streaming, validated, atomic conversion
* `load_nemo(path, tp=...)`: a NeMo checkpoint as a `Qwen3NextModel`, no trainer
"""

from .config import Qwen3NextNeMoConfig, from_core, qwen3_next_80b_a3b_nemo, qwen3_next_tiny_nemo
from .convert import ConversionError, ConversionReport, convert_hf_to_nemo, convert_nemo_to_hf
from .connectors import HFQwen3NextExporter, HFQwen3NextImporter
from .model import Qwen3NextModel, load_nemo

__all__ = [
    "ConversionError",
    "ConversionReport",
    "HFQwen3NextExporter",
    "HFQwen3NextImporter",
    "Qwen3NextModel",
    "Qwen3NextNeMoConfig",
    "convert_hf_to_nemo",
    "convert_nemo_to_hf",
    "from_core",
    "load_nemo",
    "qwen3_next_80b_a3b_nemo",
    "qwen3_next_tiny_nemo",
]
