"""`ops/flash_qla_states`: which FlashQLA it trusts, and its switch (CPU; the numerics are GPU tests in
tests/test_gpu_gdn.py::test_flash_qla_kept_states_match_recompute)."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from nemo_qwen3_next.ops import flash_qla_states

gdr = importlib.import_module("nemo_qwen3_next.ops.gated_delta_rule")


def _fake_flash_qla(monkeypatch, version, missing=()):
    """A stand-in `flash_qla` package with the names `flash_qla_states` reaches into (minus `missing`)."""
    pkg = types.ModuleType("flash_qla")
    pkg.__version__ = version
    chunk = types.ModuleType("flash_qla.ops.gated_delta_rule.chunk")
    for n in flash_qla_states.REQUIRED:
        if n not in missing:
            setattr(chunk, n, object())
    utils = types.ModuleType("flash_qla.utils")
    utils.l2norm_fwd = utils.l2norm_bwd = object()
    ops, gd = types.ModuleType("flash_qla.ops"), types.ModuleType("flash_qla.ops.gated_delta_rule")
    gd.chunk, ops.gated_delta_rule, pkg.ops, pkg.utils = chunk, gd, ops, utils
    for name, mod in [("flash_qla", pkg), ("flash_qla.ops", ops), ("flash_qla.ops.gated_delta_rule", gd),
                      ("flash_qla.ops.gated_delta_rule.chunk", chunk), ("flash_qla.utils", utils)]:
        monkeypatch.setitem(sys.modules, name, mod)
    flash_qla_states._internals.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_cache():
    flash_qla_states._internals.cache_clear()
    yield
    flash_qla_states._internals.cache_clear()


def test_only_a_checked_flash_qla_version_is_used(monkeypatch):
    _fake_flash_qla(monkeypatch, flash_qla_states.CHECKED_VERSIONS[-1])
    assert flash_qla_states.available()
    _fake_flash_qla(monkeypatch, "9.9.9")  # its internals may have moved: take the public function instead
    assert not flash_qla_states.available()
    _fake_flash_qla(monkeypatch, flash_qla_states.CHECKED_VERSIONS[-1], missing=("cp_preprocess_bwd",))
    assert not flash_qla_states.available()


def test_keep_states_switch_is_checked(monkeypatch):
    x = torch.zeros(2, requires_grad=True)
    monkeypatch.setattr(gdr, "KEEP_CHUNK_STATES", "yes")
    with pytest.raises(ValueError, match="QWEN3_NEXT_GDN_KEEP_STATES must be 0 or 1, got 'yes'"):
        gdr._keep_chunk_states(x)
    _fake_flash_qla(monkeypatch, flash_qla_states.CHECKED_VERSIONS[-1])
    monkeypatch.setattr(gdr, "KEEP_CHUNK_STATES", "1")
    assert gdr._keep_chunk_states(x)
    assert not gdr._keep_chunk_states(x.detach())  # no backward will run: nothing to keep
    with torch.no_grad():
        assert not gdr._keep_chunk_states(x)
    monkeypatch.setattr(gdr, "KEEP_CHUNK_STATES", "0")
    assert not gdr._keep_chunk_states(x)
