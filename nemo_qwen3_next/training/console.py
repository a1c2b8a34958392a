"""A concise console for `examples/pretrain.py`: the libraries' info logs, and the warnings no user of
the script can act on, stay off it unless ``logging.verbose=true``. Imports nothing heavy, so the
entry point calls it before the imports that log (Megatron and NeMo log at import time)."""

from __future__ import annotations

import logging
import re
import sys
import warnings

# Library warnings about their own optional parts or internals, printed on every run whatever the
# config: nothing in the config or the environment of this script changes them (kept in Hydra's log).
_NOISE = (
    r"Transformer Engine and Apex are not installed", r"Failed to create unified memory mempool",
    r"fused_indices_to_multihot has reached end of life", r"OneLogger: ", r"No exporters were provided",
    r"Cannot import zarr", r"transformer_engine not installed", r"The (deploy|evaluate) module could not be imported",
    r"NeMoLogger is logging to .*, but it already exists", r'"update_logger_directory" is True',
    r"There were no checkpoints found in checkpoint_dir", r"Unknown MLP type: ", r"Rerun State Machine",
    r"RerunStateMachine initialized",
)
_NOISE_RE = re.compile("|".join(_NOISE))


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE_RE.search(record.getMessage())


_DROP = _DropNoise()


def quiet_console(verbose: bool) -> None:
    """Keep NeMo/Megatron/Lightning info logs (process groups, a parameter list per gradient bucket,
    Lightning's model summary) and the `_NOISE` warnings off the console; other warnings still show,
    and Hydra's log file (``run_dir/hydra/pretrain.log``) still receives the root logger's records
    (the noise from other loggers included). Call again once NeMo is imported: its logger has its own
    handler."""
    if verbose:
        return
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=f".*(?:{pattern})")
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # Hydra's console handler, not its file handler
            handler.setLevel(logging.WARNING)
    loggers = [logging.getLogger()] + [x for x in logging.root.manager.loggerDict.values()
                                       if isinstance(x, logging.Logger)]
    for handler in {h for x in loggers for h in x.handlers}:  # every console handler (NeMo adds its own)
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                and _DROP not in handler.filters:
            handler.addFilter(_DROP)
    nemo = logging.getLogger("nemo_logger")  # NeMo's own logger (console handler of its own)
    if _DROP not in nemo.filters:
        nemo.addFilter(_DROP)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if "nemo.utils" in sys.modules:
        from nemo.utils import logging as nemo_logging

        nemo_logging.setLevel(logging.WARNING)
