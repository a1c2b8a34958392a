"""`Qwen3NextModel` (a NeMo `llm.GPTModel`) and `load_nemo`.

Its Hugging Face connectors live in `connectors.py` (they import the converter, which imports
`context.py`, which imports this module: keeping them apart keeps the imports a line, not a circle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from nemo.collections.llm.gpt.model.base import GPTModel
from nemo.lightning import io

from .config import Qwen3NextNeMoConfig, qwen3_next_80b_a3b_nemo
from .loss_reduction import SyncFreeMaskedTokenLossReduction


class Qwen3NextModel(GPTModel):
    """NeMo 2 Qwen3-Next: `llm.GPTModel` whose config builds our hybrid GDN / gated-attention decoder."""

    def __init__(self, config: Optional[Qwen3NextNeMoConfig] = None, optim=None, tokenizer=None,
                 model_transform: Optional[Callable] = None):
        super().__init__(config or qwen3_next_80b_a3b_nemo(), optim=optim, tokenizer=tokenizer,
                         model_transform=model_transform)

    @property
    def training_loss_reduction(self) -> SyncFreeMaskedTokenLossReduction:
        """NeMo's masked-token loss reduction without its per-micro-batch host sync (see
        `loss_reduction.py`); validation keeps NeMo's, which runs outside the timed step."""
        if not self._training_loss_reduction:
            self._training_loss_reduction = SyncFreeMaskedTokenLossReduction()
        return self._training_loss_reduction


def load_nemo(path: str, tp: int = 1, pp: int = 1, ep: int = 1, **config_overrides) -> Qwen3NextModel:
    """A `Qwen3NextModel` with the weights of the NeMo checkpoint `path`, at any TP/PP/EP, without a
    trainer (call `init_distributed(tp, pp, ep)` first when running under torchrun)."""
    from megatron.core import dist_checkpointing

    from ..checkpoint import check_nemo_dir
    from ..model import init_distributed
    from .cpu import apply as apply_cpu
    from .streaming import NEMO_SHARDED_METADATA, PREFIX

    check_nemo_dir(path, deep=True)
    apply_cpu()
    init_distributed(tp, pp, ep)
    model = io.load_context(Path(path) / "context", subpath="model")
    cfg = model.config
    for k, v in dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                     expert_model_parallel_size=ep, perform_initialization=False,
                     use_cpu_initialization=not torch.cuda.is_available(), **config_overrides).items():
        setattr(cfg, k, v)
    if tp > 1 and cfg.num_moe_experts:
        cfg.sequence_parallel = True  # Megatron: MoE with TP > 1 needs sequence parallelism
    model.configure_model()
    sharded = model.module.sharded_state_dict(prefix=PREFIX, metadata=dict(NEMO_SHARDED_METADATA))
    state = dist_checkpointing.load(sharded, str(Path(path) / "weights"))
    missing, unexpected = model.module.load_state_dict(
        {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model
