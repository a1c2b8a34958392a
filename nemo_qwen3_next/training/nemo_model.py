"""The NeMo classes pretraining uses: the project's NeMo glue (`nemo_qwen3_next.nemo`)."""

from __future__ import annotations


def model_classes():
    """(config class, model class) for Qwen3-Next in NeMo."""
    from ..nemo import Qwen3NextModel, Qwen3NextNeMoConfig

    return Qwen3NextNeMoConfig, Qwen3NextModel
