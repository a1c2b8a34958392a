"""The pretraining config: one dataclass per Hydra group, and `validate` that checks a composed
config before anything is built.

Groups: ``model`` (any `Qwen3NextConfig` / NeMo `GPTConfig` field),
``trainer``, ``data``, ``optim``, ``parallelism``, ``checkpoint``, ``logging``. Every error is one
line that names the field and the fix (`ConfigError`), raised before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

from ..field_checks import MODEL_FIELD_KINDS, ConfigError, check_field


@dataclass
class TrainerConfig:
    max_steps: int = 200
    val_check_interval: int = 100
    limit_val_batches: int = 4
    log_every_n_steps: int = 10
    accelerator: str = "auto"  # auto: gpu when CUDA is available, else cpu
    num_nodes: int = 1
    precision: str = "32"  # "bf16-mixed" on GPU
    gradient_clip_val: float = 1.0
    deterministic: bool = False


@dataclass
class DataConfig:
    paths: Any = None  # None/[] -> embedded corpus; else a prefix, a blend [w1, p1, w2, p2] or {train,validation,test}
    mock: bool = False  # random tokens at the model's vocab size, no files (data=mock; throughput runs)
    tokenizer: str = "byte"  # "byte" or a Hugging Face tokenizer name/path (real data)
    seq_length: int = 128
    micro_batch_size: int = 4
    global_batch_size: int = 8
    split: str = "95,5,0"
    num_workers: int = 0
    pin_memory: bool = False
    cache_dir: str = "runs/data"
    index_mapping_dir: Optional[str] = None
    embedded_max_bytes: int = 8_000_000
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


@dataclass
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    use_distributed_optimizer: bool = False


@dataclass
class ParallelismConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    devices: Optional[int] = None  # processes per node; None -> $LOCAL_WORLD_SIZE (torchrun) or 1


@dataclass
class CheckpointConfig:
    every_n_steps: int = 50
    save_last: bool = True
    save_top_k: int = -1  # keep all periodic checkpoints (they are small for the tiny model)
    async_save: bool = False  # True on GPU; the CPU path fails at teardown with it
    resume: bool = True  # rerunning the same command resumes from the latest checkpoint
    save_optim_on_train_end: bool = True
    save_initial: bool = False  # also write the initial weights to <run_dir>/init_checkpoint
    init_from: Optional[str] = None  # start from these weights (a checkpoint dir); optimizer starts fresh


@dataclass
class LoggingConfig:
    log_every_n_steps: int = 1
    tensorboard: bool = True
    loss_curve_png: bool = True
    moe_metrics: bool = True
    metrics_file: str = "metrics.jsonl"
    progress: str = "auto"  # bar (Lightning's TQDM) | lines (one per logged step) | auto: bar on a terminal
    verbose: bool = False  # also NeMo/Megatron/Lightning info logs and the model summary on the console
    timing_warmup_steps: int = 5  # steps left out of the closing median step time (kernel compilation)
    profile_steps: Any = None  # [start, stop]: torch.profiler over those steps, cProfile over as many after (training/profiling.py)


@dataclass
class PretrainConfig:
    name: str = "qwen3_next_tiny"
    run_dir: str = "runs/qwen3_next_tiny"
    seed: int = 1234
    dry_run: bool = False
    model: Dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


_GROUPS = {
    "trainer": TrainerConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "parallelism": ParallelismConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}
# Model fields owned by another group: giving them under `model` would be silently overridden.
_MODEL_FIELDS_ELSEWHERE = {
    "tensor_model_parallel_size": "parallelism", "pipeline_model_parallel_size": "parallelism",
    "expert_model_parallel_size": "parallelism", "context_parallel_size": "parallelism",
    "sequence_parallel": "parallelism", "expert_tensor_parallel_size": "parallelism",
    "virtual_pipeline_model_parallel_size": "parallelism", "seq_length": "data",
}


def _unknown(where: str, key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {where}.{close[0]}?" if close else f"known fields: {', '.join(sorted(known))}"
    return ConfigError(f"{where}.{key} is not a config field; {hint}")


def _model_field_names():
    from .nemo_model import model_classes

    cfg_cls, _ = model_classes()
    return {f.name for f in dataclasses.fields(cfg_cls)}


def validate(raw: Dict[str, Any], world_size: int, model_keys: bool = True) -> PretrainConfig:
    """Check a composed config (a plain dict) and return it typed. Raises `ConfigError`.
    Stdlib only up to the `model` keys, which need NeMo's config class (~4 s of imports): a CLI
    passes ``model_keys=False`` to answer a bad value at once, then calls `check_model_keys`."""
    raw = dict(raw)
    top = {f.name for f in dataclasses.fields(PretrainConfig)}
    for key in raw:
        if key not in top:
            close = difflib.get_close_matches(key, list(top), n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(top))}"
            raise ConfigError(f"{key} is not a top-level config field; {hint}")
    groups = {}
    for name, cls in _GROUPS.items():
        values = dict(raw.get(name) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise _unknown(name, key, known)
        _check_types(name, cls, values)
        try:
            groups[name] = cls(**values)
        except TypeError as e:  # pragma: no cover - covered by the key check above
            raise ConfigError(f"{name}: {e}") from None

    model = dict(raw.get("model") or {})
    for name, kind in MODEL_FIELD_KINDS.items():  # the model config checks these again when it is built
        if name in model:
            check_field(f"model.{name}", model[name], kind)
    check_field("seed", raw.get("seed", PretrainConfig.seed), "nonneg")
    cfg = PretrainConfig(
        name=raw.get("name", PretrainConfig.name),
        run_dir=raw.get("run_dir", PretrainConfig.run_dir),
        seed=int(raw.get("seed", PretrainConfig.seed)),
        dry_run=bool(raw.get("dry_run", False)),
        model=model,
        **groups,
    )
    _check_values(cfg)
    _check_parallel_layout(cfg, world_size)
    _check_batch(cfg, world_size)
    if cfg.data.paths == "???" and not cfg.dry_run:  # a config that names no data; --dry-run only inspects
        raise ConfigError("data.paths is required for this config: give data.paths='[/path/prefix]' "
                          "(see docs/pretraining.md)")
    if model_keys:
        check_model_keys(model)
    return cfg


_TYPE_TEXT = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _check_types(group: str, cls, values: Dict[str, Any]) -> None:
    """Each value has its field's annotated type (Hydra hands `trainer.max_steps=abc` over as a string)."""
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v, t = values[f.name], str(f.type)
        optional = t.startswith("Optional[")
        base = t[len("Optional["):-1] if optional else t
        if (v is None and optional) or base not in _TYPE_TEXT:
            continue
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = {"int": isinstance(v, int) and not isinstance(v, bool), "float": number, "bool": isinstance(v, bool),
              "str": isinstance(v, str) or number}[base]
        if not ok:
            raise ConfigError(f"{group}.{f.name} = {v!r} ({type(v).__name__}) must be {_TYPE_TEXT[base]}"
                              f"{' or null' if optional else ''}; e.g. {group}.{f.name}={f.default}")


# (group, field) -> `check_field` kind: the signs and ranges a run needs (checked before anything is built)
_VALUE_KINDS = {
    ("trainer", "max_steps"): "pos", ("trainer", "val_check_interval"): "pos", ("trainer", "num_nodes"): "pos",
    ("trainer", "limit_val_batches"): "nonneg", ("trainer", "log_every_n_steps"): "pos",
    ("trainer", "gradient_clip_val"): "nonnegf", ("data", "seq_length"): "pos", ("data", "micro_batch_size"): "pos",
    ("data", "global_batch_size"): "pos", ("data", "num_workers"): "nonneg", ("data", "embedded_max_bytes"): "pos",
    ("optim", "lr"): "posf", ("optim", "min_lr"): "nonnegf", ("optim", "warmup_steps"): "nonneg",
    ("optim", "weight_decay"): "nonnegf", ("optim", "adam_beta1"): "prob", ("optim", "adam_beta2"): "prob",
    ("optim", "adam_eps"): "posf", ("checkpoint", "every_n_steps"): "pos", ("logging", "log_every_n_steps"): "pos",
}


def _dataset_prefixes(paths) -> Iterator[str]:
    """The indexed-dataset prefixes in `data.paths` (a prefix, a blend [w1, p1, ...] or {train: ...})."""
    if isinstance(paths, str):
        try:
            float(paths)  # a blend weight given as a string
        except ValueError:
            yield paths
    elif isinstance(paths, dict):
        for v in paths.values():
            yield from _dataset_prefixes(v)
    elif isinstance(paths, (list, tuple)):
        for v in paths:
            yield from _dataset_prefixes(v)


def _check_values(cfg: PretrainConfig) -> None:
    for (group, name), kind in _VALUE_KINDS.items():
        check_field(f"{group}.{name}", getattr(getattr(cfg, group), name), kind)
    o, d = cfg.optim, cfg.data
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr ({o.min_lr}) > optim.lr ({o.lr}); the schedule decays to min_lr, lower it.")
    max_pos = cfg.model.get("max_position_embeddings")
    if isinstance(max_pos, int) and d.seq_length > max_pos:
        raise ConfigError(f"data.seq_length ({d.seq_length}) > model.max_position_embeddings ({max_pos}); positions "
                          f"beyond it were never trained: shorten data.seq_length or raise max_position_embeddings.")
    if d.paths not in (None, "???"):
        for prefix in _dataset_prefixes(d.paths):
            missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
            if missing:
                raise ConfigError(f"data.paths: {missing[0]} does not exist; give the prefix of a Megatron indexed "
                                  f"dataset (PREFIX.bin + PREFIX.idx; see scripts/prepare_pretraining_data.py).")
    _check_profile_steps(cfg.logging.profile_steps, cfg.trainer.max_steps)
    init = cfg.checkpoint.init_from
    if init is not None and not os.path.isdir(str(init)):
        raise ConfigError(f"checkpoint.init_from = {init!r} is not a directory; give a checkpoint directory "
                          f"or set checkpoint.init_from=null.")


def _check_profile_steps(steps, max_steps: int) -> None:
    if steps is None:
        return
    ok = (isinstance(steps, (list, tuple)) and len(steps) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in steps) and 0 <= steps[0] < steps[1])
    if not ok:
        raise ConfigError(f"logging.profile_steps = {steps!r} must be [start, stop] with 0 <= start < stop, "
                          f"e.g. logging.profile_steps=[10,12], or null.")
    if 2 * steps[1] - steps[0] > max_steps:
        raise ConfigError(f"logging.profile_steps = {list(steps)} profiles up to step {2 * steps[1] - steps[0] - 1} "
                          f"(torch.profiler over [start, stop), then cProfile over as many steps) but "
                          f"trainer.max_steps is {max_steps}; lower the steps or raise trainer.max_steps.")


def check_model_keys(model: Dict[str, Any]) -> None:
    """Each `model` key is a field of the model config (needs NeMo) and not owned by another group."""
    known = _model_field_names()
    for key in model:
        if key in _MODEL_FIELDS_ELSEWHERE:
            raise ConfigError(f"model.{key} is set by {_MODEL_FIELDS_ELSEWHERE[key]}.{key}; move it there.")
        if key not in known:
            raise _unknown("model", key, known)


def _check_parallel_layout(cfg: PretrainConfig, world_size: int) -> None:
    p = cfg.parallelism
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                 "context_parallel_size"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallelism.{name} = {getattr(p, name)} must be >= 1.")
    tp, pp, cp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                      p.expert_model_parallel_size)
    etp = p.expert_tensor_parallel_size or tp
    model_parallel = tp * pp * cp
    if world_size % model_parallel != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor({tp}) x pipeline({pp}) x context({cp}) = "
            f"{model_parallel}; launch a multiple of {model_parallel} processes or shrink the parallel sizes."
        )
    if world_size % (etp * ep * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by expert_tensor({etp}) x expert({ep}) x pipeline({pp}) = "
            f"{etp * ep * pp}; change parallelism.expert_model_parallel_size."
        )
    if tp > 1 and not p.sequence_parallel and cfg.model.get("num_moe_experts", 1):
        raise ConfigError(
            "parallelism.sequence_parallel must be true when tensor_model_parallel_size > 1 with MoE "
            "(Megatron's MoE token dispatch expects sequence-parallel input); set parallelism.sequence_parallel=true."
        )
    if tp == 1 and p.sequence_parallel:
        raise ConfigError("parallelism.sequence_parallel=true needs tensor_model_parallel_size > 1; set it false.")


def _check_batch(cfg: PretrainConfig, world_size: int) -> None:
    p, d = cfg.parallelism, cfg.data
    dp = world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size)
    if d.global_batch_size % (d.micro_batch_size * dp) != 0:
        raise ConfigError(
            f"data.global_batch_size ({d.global_batch_size}) is not divisible by micro_batch_size "
            f"({d.micro_batch_size}) x data-parallel size ({dp}); make it a multiple of {d.micro_batch_size * dp}."
        )
    if cfg.trainer.max_steps < 1:
        raise ConfigError(f"trainer.max_steps = {cfg.trainer.max_steps} must be >= 1.")
    if p.sequence_parallel and d.seq_length % p.tensor_model_parallel_size != 0:
        raise ConfigError(
            f"data.seq_length ({d.seq_length}) must be divisible by tensor_model_parallel_size "
            f"({p.tensor_model_parallel_size}) with sequence parallelism."
        )
