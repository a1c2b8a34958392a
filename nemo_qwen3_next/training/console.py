"""A concise console for `examples/pretrain.py`: the libraries' info logs stay off it unless
``logging.verbose=true``. Imports nothing heavy, so the entry point calls it before the imports
that log (Megatron logs at import time)."""

from __future__ import annotations

import logging
import sys


def quiet_console(verbose: bool) -> None:
    """Keep NeMo/Megatron/Lightning info logs (process groups, a parameter list per gradient bucket,
    Lightning's model summary) off the console; warnings still show, and Hydra's log file
    (``run_dir/hydra/pretrain.log``) still receives the root logger's records. Call again once NeMo
    is imported: its logger has its own handler."""
    if verbose:
        return
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # Hydra's console handler, not its file handler
            handler.setLevel(logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if "nemo.utils" in sys.modules:
        from nemo.utils import logging as nemo_logging

        nemo_logging.setLevel(logging.WARNING)
