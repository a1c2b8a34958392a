"""Build and run a pretraining job from a validated `PretrainConfig`.

One function per part, named for what it builds: `model_config`, `tokenizer`, `strategy`,
`trainer`, `optimizer`, `checkpointing`; `run` wires them into NeMo's `llm.train`.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, Optional

import torch

from ..config import ConfigError
from .config import PretrainConfig
from .console import quiet_console
from .run_plan import latest_checkpoint, plan  # noqa: F401  (recipe.plan / recipe.latest_checkpoint)


def on_cpu(cfg: PretrainConfig) -> bool:
    return cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()


def model_config(cfg: PretrainConfig, cpu: bool):
    """The NeMo model config: `cfg.model` + parallel sizes + sequence length + device flags.

    Construction validates everything (our `ConfigError`s and Megatron's own asserts) and
    allocates nothing; any failure becomes one `ConfigError` line."""
    from .nemo_model import model_classes

    cfg_cls, _ = model_classes()
    p = cfg.parallelism
    kw: Dict[str, Any] = dict(cfg.model)
    kw.update(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        seq_length=cfg.data.seq_length,
    )
    bf16 = "bf16" in str(cfg.trainer.precision)
    kw.setdefault("bf16", bf16)
    kw["params_dtype"] = torch.bfloat16 if bf16 else torch.float32
    kw.setdefault("pipeline_dtype", kw["params_dtype"])  # Megatron requires it with PP > 1
    if cpu:
        kw.update(use_cpu_initialization=True, gradient_accumulation_fusion=False, moe_token_dispatcher_type="allgather")
    for key in ("layer_types", "mlp_only_layers"):  # YAML lists -> plain lists
        if kw.get(key) is not None:
            kw[key] = list(kw[key])
    try:
        return cfg_cls(**kw)
    except ConfigError:
        raise
    except (AssertionError, ValueError, TypeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"model config rejected: {msg}") from None


def tokenizer(cfg: PretrainConfig, vocab_size: int):
    if cfg.data.tokenizer == "byte":
        from .tokenizer import ByteTokenizer

        return ByteTokenizer(vocab_size)
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    return AutoTokenizer(cfg.data.tokenizer)


def strategy(cfg: PretrainConfig, cpu: bool):
    from megatron.core.distributed import DistributedDataParallelConfig
    from nemo import lightning as nl

    p = cfg.parallelism
    return nl.MegatronStrategy(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        ckpt_async_save=cfg.checkpoint.async_save and not cpu,
        ckpt_parallel_save=not cpu,
        ckpt_load_strictness="assume_ok_unexpected",
        ddp=DistributedDataParallelConfig(
            check_for_nan_in_grad=True,
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=not cpu,
            overlap_param_gather=not cpu and cfg.optim.use_distributed_optimizer,
            use_distributed_optimizer=cfg.optim.use_distributed_optimizer,
            average_in_collective=True,
        ),
    )


def optimizer(cfg: PretrainConfig, bf16: bool):
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl

    o = cfg.optim
    if o.warmup_steps >= cfg.trainer.max_steps and cfg.trainer.max_steps > 1:
        warmup = max(1, cfg.trainer.max_steps // 10)
    else:
        warmup = o.warmup_steps
    opt_cfg = OptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=cfg.trainer.gradient_clip_val,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.use_distributed_optimizer,
    )
    sched = nl.lr_scheduler.CosineAnnealingScheduler(
        max_steps=cfg.trainer.max_steps, warmup_steps=warmup, constant_steps=0, min_lr=o.min_lr
    )
    return nl.MegatronOptimizerModule(config=opt_cfg, lr_scheduler=sched)


def checkpointing(cfg: PretrainConfig):
    from nemo import lightning as nl

    c = cfg.checkpoint
    return nl.ModelCheckpoint(
        dirpath=os.path.join(cfg.run_dir, "checkpoints"),
        filename="{step}-{consumed_samples}",
        every_n_train_steps=c.every_n_steps,
        save_last=c.save_last,
        save_top_k=c.save_top_k,
        monitor="step",
        mode="max",
        save_on_train_epoch_end=False,
        save_optim_on_train_end=c.save_optim_on_train_end,
        always_save_context=False,
        save_context_on_train_end=False,
    )


def check_run_options(cfg: PretrainConfig) -> None:
    """The options `run` reads beyond the model: one `ConfigError` line each."""
    progress_mode(cfg)
    if cfg.data.mock and cfg.parallelism.context_parallel_size > 1:
        raise ConfigError("data=mock sends no dense attention mask, which context parallelism splits; "
                          "set parallelism.context_parallel_size=1 or use indexed data.")


def progress_mode(cfg: PretrainConfig) -> str:
    """`bar` or `lines` for `logging.progress` (auto: the bar only on a terminal; a log file gets lines)."""
    mode = str(cfg.logging.progress)
    if mode not in ("auto", "bar", "lines"):
        raise ConfigError(f"logging.progress = {mode!r} is not one of auto, bar, lines; set logging.progress=auto.")
    if mode == "auto":
        return "bar" if sys.stdout.isatty() else "lines"
    return mode


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def model_line(mcfg, label: str, cfg: PretrainConfig):
    """(pl_module) -> the one model summary line, counted on the built (possibly sharded) model."""
    from .dry_run import count_named_parameters

    p = cfg.parallelism
    sharded = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.expert_model_parallel_size > 1
    kinds = mcfg.layer_types
    experts = f", {mcfg.num_moe_experts} experts top-{mcfg.moe_router_topk}" if mcfg.num_moe_experts else ""

    def line(pl_module) -> str:
        c = count_named_parameters(pl_module.named_parameters(), mcfg)
        return (f"model {label}: {_count(c['total'])} parameters{' on this rank' if sharded else ''} "
                f"({_count(c['active'])} active per token), {mcfg.num_layers} layers "
                f"({kinds.count('linear_attention')} Gated DeltaNet + {kinds.count('full_attention')} gated attention)"
                f"{experts}")

    return line


def kernel_cache_report(info: dict) -> str:
    """How many TileLang kernels / Triton entries this run compiled into the kernel cache."""
    from ..kernel_cache import count_entries

    now = count_entries(info["dirs"])
    new = {k: now[k] - info["entries"].get(k, 0) for k in now}
    return (f"kernel cache: +{new['TILELANG_CACHE_DIR']} TileLang kernels, +{new['TRITON_CACHE_DIR']} Triton entries "
            f"compiled this run, kept for the next one in {info['dir']}")


def _with_profile_lines(on_end, profiler):
    """The closing summary also names the profile reports."""
    def lines():
        return list(on_end() if on_end else []) + [f"profile: {p}" for p in profiler.written]
    return lines


def run(cfg: PretrainConfig, label: str = "", kernel_cache: Optional[dict] = None) -> str:
    """Train; returns the run directory. Assumes `cfg` came from `config.validate`. `label` names the
    model (the Hydra choice) in the console and the plot; `kernel_cache` is
    `kernel_cache.configure_kernel_cache()`'s result, reported at the start and the end."""
    from . import fixes

    rank0 = os.environ.get("RANK", "0") == "0"
    what, todo = plan(cfg)
    if rank0:
        print(what, flush=True)
    if not todo:
        return cfg.run_dir
    cpu = on_cpu(cfg)
    fixes.apply(force_cpu=cpu)
    mcfg = model_config(cfg, cpu)
    quiet_console(cfg.logging.verbose)  # again: NeMo is imported now
    mode = progress_mode(cfg)

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from nemo import lightning as nl
    from nemo.collections import llm

    from .callbacks import ProgressBar, TrainingMetrics
    from .data import make_data_module
    from .flops import train_flops_per_step
    from .nemo_model import model_classes

    pl.seed_everything(cfg.seed, workers=True)
    os.makedirs(cfg.run_dir, exist_ok=True)
    tok = tokenizer(cfg, mcfg.vocab_size)
    data = make_data_module(cfg.data, tok, cfg.data.seq_length, cfg.data.micro_batch_size,
                            cfg.data.global_batch_size, cfg.seed)
    bf16 = bool(mcfg.bf16)
    optim = optimizer(cfg, bf16)
    _, model_cls = model_classes()
    model = model_cls(mcfg, optim=optim, tokenizer=tok)

    p = cfg.parallelism
    devices = p.devices or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # Under torchrun the launch decides the node count (--nnodes); the config's is for --dry-run.
    num_nodes = int(os.environ["WORLD_SIZE"]) // devices if "WORLD_SIZE" in os.environ else cfg.trainer.num_nodes
    moe_layers = sum(mcfg.is_moe_layer(i) for i in range(mcfg.num_layers))
    metrics = TrainingMetrics(
        run_dir=cfg.run_dir,
        tokens_per_step=cfg.data.global_batch_size * cfg.data.seq_length,
        flops_per_step=train_flops_per_step(mcfg, cfg.data.seq_length, cfg.data.global_batch_size),
        log_every_n_steps=cfg.logging.log_every_n_steps,
        metrics_file=cfg.logging.metrics_file,
        moe_layers=mcfg.num_layers + (mcfg.mtp_num_layers or 0) if (moe_layers and cfg.logging.moe_metrics) else 0,
        num_experts=(mcfg.num_moe_experts or 0) if cfg.logging.moe_metrics else 0,
        loss_curve_png=cfg.logging.loss_curve_png,
        warmup_steps=cfg.logging.timing_warmup_steps,
        print_lines=mode == "lines",
        title=f"{label or 'Qwen3-Next'} | run {cfg.name}",
        model_line=model_line(mcfg, label or cfg.name, cfg),
        on_end=(lambda: [kernel_cache_report(kernel_cache)]) if kernel_cache else None,
        mtp_layers=mcfg.mtp_num_layers or 0,
    )
    if kernel_cache and rank0 and (not cpu or cfg.logging.verbose):
        from ..kernel_cache import describe

        print(describe(kernel_cache), flush=True)
    # metrics first: a step's time must not include the checkpoint callback's save at its end
    callbacks = [metrics, checkpointing(cfg)] + ([ProgressBar(metrics)] if mode == "bar" else [])
    profiler = None
    if cfg.logging.profile_steps is not None:
        from .callbacks import ProfileSteps
        from .profiling import StepProfiler

        profiler = StepProfiler(os.path.join(cfg.run_dir, "profile"), *cfg.logging.profile_steps)
        callbacks.insert(1, ProfileSteps(profiler))  # inside the metrics' timed step
        metrics.on_end = _with_profile_lines(metrics.on_end, profiler)
    if cfg.checkpoint.save_initial:
        from .callbacks import SaveInitialCheckpoint

        callbacks.append(SaveInitialCheckpoint(os.path.join(cfg.run_dir, "init_checkpoint")))
    plugins = []
    if cfg.trainer.precision not in ("32", "32-true", 32):
        plugins.append(nl.MegatronMixedPrecision(precision=cfg.trainer.precision))
    trainer = nl.Trainer(
        accelerator="cpu" if cpu else "gpu",
        devices=devices,
        num_nodes=num_nodes,
        max_steps=cfg.trainer.max_steps,
        val_check_interval=cfg.trainer.val_check_interval,
        # count val_check_interval in steps over the whole run, not within an "epoch" (one pass over
        # the training split): otherwise an interval longer than one pass is refused at startup
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.trainer.limit_val_batches,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        num_sanity_val_steps=0,
        enable_progress_bar=mode == "bar",
        enable_model_summary=cfg.logging.verbose,  # else: our one model line
        use_distributed_sampler=False,
        strategy=strategy(cfg, cpu),
        plugins=plugins,
        # The checkpoint callback goes in directly: NeMoLogger(ckpt=...) probes an optional
        # nvidia_resiliency_ext class that is not installed everywhere.
        callbacks=callbacks,
        deterministic=cfg.trainer.deterministic,
    )
    logger = nl.NeMoLogger(
        explicit_log_dir=cfg.run_dir,
        use_datetime_version=False,
        ckpt=None,
        # NeMoLogger re-roots the logger under run_dir: events land in <run_dir>/tensorboard.
        tensorboard=TensorBoardLogger(save_dir="tensorboard", name="", version="") if cfg.logging.tensorboard else None,
    )
    restore = None
    if cfg.checkpoint.init_from:
        restore = nl.RestoreConfig(path=os.path.abspath(cfg.checkpoint.init_from), load_model_state=True,
                                   load_optim_state=False, load_artifacts=False)
    # A checkpoint of this run (rerun after a stop) wins over init_from.
    resume = nl.AutoResume(resume_if_exists=cfg.checkpoint.resume, resume_ignore_no_checkpoint=True,
                           restore_config=restore)
    llm.train(model=model, data=data, trainer=trainer, log=logger, resume=resume, optim=optim, tokenizer="data")
    return cfg.run_dir
