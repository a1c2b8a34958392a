"""Shared test set-up: CPU-friendly defaults for megatron-core."""

import os

# megatron's jit_fuser is torch.compile; compiling on CPU costs ~18 s per new graph.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
