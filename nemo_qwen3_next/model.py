"""Build a Megatron-Core `GPTModel` for Qwen3-Next, and the process set-up it needs.

`build_model(config)` is the whole recipe: our block spec, RoPE with `rotary_percent`,
(un)tied embeddings. `init_single_process()` gives a plain Python process what Megatron
expects (a one-rank process group, model-parallel state, RNG tracker) so the model can be
built and run outside torchrun, e.g. in a notebook or a test.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.models.gpt import GPTModel

from .compat import apply_cpu_compat, seed_cpu
from .modules.output_layer import FusedLossOutputLayer, is_fused_loss
from .modules.mtp import get_mtp_block_spec, mtp_postprocess
from .spec import get_qwen3_next_block_spec, get_qwen3_next_layer_spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234, cp: int = 1) -> None:
    """Initialise torch.distributed (one process if not launched by torchrun) and Megatron state.

    ``cp`` is the context-parallel size (`nemo_qwen3_next.parallel.context`); TP x PP x CP must divide
    the world size, checked here in one line rather than deep inside Megatron.
    """
    from megatron.core import parallel_state

    apply_cpu_compat()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        else:
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
            )
    if not parallel_state.model_parallel_is_initialized():
        world = dist.get_world_size()
        if cp > world:
            raise ValueError(f"context_parallel_size (cp={cp}) > world size ({world}); launch at least {cp} "
                             f"processes (torchrun --nproc-per-node {cp}) or lower cp.")
        if world % (tp * pp * cp):
            raise ValueError(f"tp x pp x cp = {tp} x {pp} x {cp} = {tp * pp * cp} does not divide the world size "
                             f"({world}); launch a multiple of {tp * pp * cp} processes or lower tp/pp/cp.")
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
            context_parallel_size=cp,
        )
    seed_all(seed)


def init_single_process(seed: int = 1234) -> None:
    """A one-rank process group and TP=PP=1 Megatron state, if none exists yet."""
    init_distributed(1, 1, 1, seed)


def seed_all(seed: int) -> None:
    """Seed torch and Megatron's tensor-parallel RNG tracker (CPU or CUDA)."""
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    else:
        seed_cpu(seed)


class Qwen3NextGPTModel(GPTModel):
    """Megatron's `GPTModel`; with ``config.fused_linear_cross_entropy`` the loss skips the logits.

    Same parameters, state dict and outputs (logits without labels; the [b, s] per-token loss with
    them, from `ops.linear_cross_entropy` via `FusedLossOutputLayer`).
    With ``config.mtp_num_layers`` it carries the Qwen3-Next MTP block (``self.mtp``, see
    `modules.mtp`): the loss path adds the MTP loss (`modules.mtp.mtp_postprocess`, the fused head too).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fuse_loss = bool(getattr(self.config, "fused_linear_cross_entropy", False))
        if self.post_process and self._fuse_loss:
            # the same module and parameters with one more forward mode (the subclass has no state)
            self.output_layer.__class__ = FusedLossOutputLayer

    def forward(self, *args, **kwargs):
        if not (self.post_process and self._fuse_loss):
            return super().forward(*args, **kwargs)
        self.output_layer.pending_labels = _FORWARD_SIG.bind(self, *args, **kwargs).arguments.get("labels")
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.output_layer.pending_labels = None

    def _postprocess(self, **kwargs):
        if not self.mtp_process:
            return super()._postprocess(**kwargs)
        return mtp_postprocess(self, super()._postprocess, **kwargs)

    def compute_language_model_loss(self, labels, logits):
        if is_fused_loss(logits):
            return logits
        return super().compute_language_model_loss(labels, logits)


_FORWARD_SIG = inspect.signature(GPTModel.forward)


def build_model(config, backend: str = "auto", pre_process: bool = True, post_process: bool = True,
                vp_stage: Optional[int] = None, parallel_output: bool = True, transformer_layer_spec=None,
                device=None, **gpt_kwargs):
    """Megatron `GPTModel` with the Qwen3-Next decoder for `config` (a `Qwen3NextConfig`).

    The one recipe (block spec, partial RoPE, (un)tied embeddings) that NeMo's `configure_model`
    uses too; it passes its own resolved `transformer_layer_spec` and extra `GPTModel` arguments.

    ``device`` (opt-in, e.g. ``"cuda"``): every parameter is created and initialised there.
    Megatron's own layers already follow ``config.use_cpu_initialization`` (False: made on the current
    GPU), but what torch makes without a device argument (norms, GDN's ``A_log`` / ``dt_bias`` /
    ``conv1d``, the MoE router) lands on the CPU and needs a ``.cuda()`` copy; under
    ``torch.device(device)`` it is made beside the rest. ``"meta"`` (with ``use_cpu_initialization=True``)
    gives shapes only, e.g. for ``to_empty`` + ``load_state_dict``. ``None`` keeps the placement unchanged.
    """
    apply_cpu_compat()
    if transformer_layer_spec is None:
        transformer_layer_spec = get_qwen3_next_block_spec(config, backend, vp_stage=vp_stage)
    kw = dict(max_sequence_length=config.max_position_embeddings)
    kw.update(gpt_kwargs)
    if "mtp_block_spec" not in kw:  # the MTP block (config.mtp_num_layers) on the last pipeline stage
        mtp_backend = getattr(config, "spec_backend", backend) if backend == "auto" else backend
        kw["mtp_block_spec"] = get_mtp_block_spec(config, get_qwen3_next_layer_spec(config, mtp_backend), vp_stage)
    with _construction_device(config, device):
        return Qwen3NextGPTModel(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=config.vocab_size,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=config.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=config.rotary_percent,
            rotary_base=config.rotary_base,
            vp_stage=vp_stage,
            **kw,
        )


def _construction_device(config, device):
    """The `torch.device` context `build_model(device=...)` builds under. Megatron's own layers place
    themselves (``use_cpu_initialization``: the CPU, else the current GPU), so a device they would not
    follow is one clear error instead of a model split across two devices."""
    if device is None:
        return contextlib.nullcontext()
    dev = torch.device(device)
    if dev.type not in ("cuda", "cpu", "meta"):
        raise ValueError(f"build_model(device={device!r}): use 'cuda', 'cpu', 'meta' or None.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"build_model(device={device!r}): CUDA is not available here; pass device=None or 'cpu'.")
        if dev.index not in (None, torch.cuda.current_device()):
            raise ValueError(f"build_model(device={device!r}): Megatron builds on the current GPU "
                             f"({torch.cuda.current_device()}); call torch.cuda.set_device({dev.index}) first.")
        return torch.device("cuda", torch.cuda.current_device())
    if (dev.type == "meta" or torch.cuda.is_available()) and not config.use_cpu_initialization:
        where = "the GPU" if torch.cuda.is_available() else "the CPU"
        raise ValueError(f"build_model(device={device!r}) with use_cpu_initialization=False: Megatron makes its "
                         f"layers on {where}; set use_cpu_initialization=True.")
    return dev
