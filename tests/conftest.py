"""Shared test set-up: CPU-friendly defaults for megatron-core."""

import os

import pytest

# megatron's jit_fuser is torch.compile; compiling on CPU costs ~18 s per new graph.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """A `data.cache_dir` the session's pretraining runs on the embedded corpus share: the first run writes
    the corpus there (atomically; ~6 s), the later ones read it."""
    return tmp_path_factory.mktemp("corpus_cache")
