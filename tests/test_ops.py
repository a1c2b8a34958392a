"""CPU tests for nemo_qwen3_next.ops: gated delta rule references/dispatch and causal conv1d."""

import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from nemo_qwen3_next.ops import (
    causal_conv1d,
    causal_conv1d_ref,
    chunk_gated_delta_rule_ref,
    gated_delta_rule,
    l2norm,
    recurrent_gated_delta_rule_ref,
)


def make_inputs(B=2, T=37, Hk=2, Hv=4, K=8, V=6, dtype=torch.float64, seed=0, normalize=True, N=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hk, K, generator=gen, dtype=dtype)
    k = torch.randn(B, T, Hk, K, generator=gen, dtype=dtype)
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = torch.randn(B, T, Hv, V, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, Hv, generator=gen, dtype=dtype) + 2)  # mild decay
    beta = torch.sigmoid(torch.randn(B, T, Hv, generator=gen, dtype=dtype))
    h0 = torch.randn(N or B, Hv, K, V, generator=gen, dtype=dtype) * 0.5
    return q, k, v, g, beta, h0


def dumb_loop(q, k, v, g, beta, h0, scale=None):
    """Independent step-by-step recurrence: python loops over batch, time and value heads."""
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    o = torch.zeros(B, T, Hv, V, dtype=torch.float64)
    S_all = h0.clone().double()
    for b in range(B):
        for h in range(Hv):
            kh = h // (Hv // Hk)
            S = S_all[b, h].clone()
            for t in range(T):
                S = S * torch.exp(g[b, t, h].double())
                kt = k[b, t, kh].double()
                pred = kt @ S  # [V]
                S = S + torch.outer(kt, beta[b, t, h].double() * (v[b, t, h].double() - pred))
                o[b, t, h] = (q[b, t, kh].double() * scale) @ S
            S_all[b, h] = S
    return o, S_all


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_chunk_recurrent_and_dumb_loop_agree(dtype, tol):
    q, k, v, g, beta, h0 = make_inputs(T=37, dtype=dtype)
    o_ref, S_ref = dumb_loop(q, k, v, g, beta, h0, scale=0.3)
    kw = dict(scale=0.3, initial_state=h0, output_final_state=True)
    o_rec, S_rec = recurrent_gated_delta_rule_ref(q, k, v, g, beta, **kw)
    o_chk, S_chk = chunk_gated_delta_rule_ref(q, k, v, g, beta, chunk_size=16, **kw)
    assert o_rec.dtype == dtype and o_chk.dtype == dtype and o_chk.shape == v.shape
    for o, S in ((o_rec, S_rec), (o_chk, S_chk)):
        torch.testing.assert_close(o.double(), o_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(S.double(), S_ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("T,chunk", [(1, 16), (16, 16), (33, 8), (5, 64)])
def test_chunk_edge_lengths(T, chunk):
    q, k, v, g, beta, h0 = make_inputs(B=1, T=T)
    o1, S1 = recurrent_gated_delta_rule_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o2, S2 = chunk_gated_delta_rule_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(S1, S2)


def test_no_final_state_and_zero_init():
    q, k, v, g, beta, _ = make_inputs(B=1, T=9)
    o, S = chunk_gated_delta_rule_ref(q, k, v, g, beta, chunk_size=4)
    assert S is None
    o2, _ = dumb_loop(q, k, v, g, beta, torch.zeros(1, 4, 8, 6, dtype=torch.float64))
    torch.testing.assert_close(o, o2)


def test_matches_hf_torch_implementations():
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    # HF works on un-normalised q/k with in-kernel l2norm, and equal q/k/v head counts (it
    # repeat_interleaves itself before calling), so do the same for the HF side.
    q, k, v, g, beta, h0 = make_inputs(B=2, T=45, dtype=torch.float32, normalize=False)
    qr, kr = (t.repeat_interleave(2, dim=2) for t in (q, k))
    with torch.no_grad():
        hf_o, hf_S = hf.torch_chunk_gated_delta_rule(
            qr, kr, v, g, beta, chunk_size=16, initial_state=h0.clone(), output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )
        hf_ro, hf_rS = hf.torch_recurrent_gated_delta_rule(
            qr, kr, v, g, beta, initial_state=h0.clone(), output_final_state=True, use_qk_l2norm_in_kernel=True
        )
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    o, S = chunk_gated_delta_rule_ref(q, k, v, g, beta, chunk_size=16, **kw)
    ro, rS = recurrent_gated_delta_rule_ref(q, k, v, g, beta, **kw)
    for a, b in ((o, hf_o), (S, hf_S), (ro, hf_ro), (rS, hf_rS), (o, hf_ro)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_use_qk_l2norm_flag_matches_outside_normalisation():
    q, k, v, g, beta, h0 = make_inputs(T=20, normalize=False)
    a = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    b = gated_delta_rule(l2norm(q), l2norm(k), v, g, beta, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


@pytest.mark.parametrize("ref", [recurrent_gated_delta_rule_ref, chunk_gated_delta_rule_ref])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_packed_cu_seqlens_equals_per_document(ref, idx_dtype):
    lens = [5, 17, 10]
    cu = torch.tensor([0, 5, 22, 32], dtype=idx_dtype)
    q, k, v, g, beta, h0 = make_inputs(B=1, T=sum(lens), N=len(lens))
    kw = dict(chunk_size=8) if ref is chunk_gated_delta_rule_ref else {}
    o, S = ref(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu, **kw)
    assert S.shape == h0.shape
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        sl = slice(s, e)
        o_n, S_n = dumb_loop(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], h0[n : n + 1])
        torch.testing.assert_close(o[:, sl], o_n)
        torch.testing.assert_close(S[n : n + 1], S_n)
    # without initial states every document starts from zeros
    o0, _ = ref(q, k, v, g, beta, cu_seqlens=cu, **kw)
    o_last, _ = dumb_loop(q[:, 22:], k[:, 22:], v[:, 22:], g[:, 22:], beta[:, 22:], torch.zeros_like(h0[:1]))
    torch.testing.assert_close(o0[:, 22:], o_last)


def test_state_chaining_equals_whole_sequence():
    """What context parallelism and generation rely on: split + carry state == one pass."""
    q, k, v, g, beta, h0 = make_inputs(T=40)
    whole, S_whole = chunk_gated_delta_rule_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                chunk_size=16)
    a, S_a = chunk_gated_delta_rule_ref(*(t[:, :23] for t in (q, k, v, g, beta)), initial_state=h0,
                                        output_final_state=True, chunk_size=16)
    b, S_b = gated_delta_rule(*(t[:, 23:] for t in (q, k, v, g, beta)), initial_state=S_a,
                              output_final_state=True, use_recurrent=True)
    torch.testing.assert_close(torch.cat([a, b], 1), whole)
    torch.testing.assert_close(S_b, S_whole)


def test_gradients_chunk_vs_recurrent():
    q, k, v, g, beta, h0 = make_inputs(B=1, T=21, seed=3)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, g, beta, h0)]
    do = torch.randn_like(v)
    dS = torch.randn_like(h0)

    def grads(fn, **kw):
        for t in leaves:
            t.grad = None
        o, S = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, **kw)
        ((o * do).sum() + (S * dS).sum()).backward()
        return [t.grad.clone() for t in leaves]

    g_rec = grads(recurrent_gated_delta_rule_ref)
    g_chk = grads(chunk_gated_delta_rule_ref, chunk_size=8)
    for name, a, b in zip("q k v g beta h0".split(), g_rec, g_chk):
        assert torch.isfinite(a).all() and a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, msg=name)


def test_dispatcher_cpu_uses_reference_and_casts_output():
    q, k, v, g, beta, h0 = make_inputs(T=19, dtype=torch.float32)
    o, S = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=8)
    o_ref, S_ref = chunk_gated_delta_rule_ref(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                              chunk_size=8)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)
    o_bf, S_bf = gated_delta_rule(q, k, v.bfloat16(), g, beta, initial_state=h0, output_final_state=True,
                                  backend="torch")
    assert o_bf.dtype == torch.bfloat16 and S_bf.dtype == torch.float32
    assert gated_delta_rule(q, k, v, g, beta)[1] is None
    with pytest.raises(ValueError):
        gated_delta_rule(q, k, v, g, beta, backend="nope")
    with pytest.raises(ValueError):  # Hv not a multiple of Hk
        gated_delta_rule(q, k, v[:, :, :3], g[..., :3], beta[..., :3])


def test_fla_backend_without_fla_raises_clear_error():
    if importlib.util.find_spec("fla") is not None:
        try:
            import fla.ops.gated_delta_rule  # noqa: F401
        except Exception:
            pass
        else:
            pytest.skip("fla is importable here")
    q, k, v, g, beta, _ = make_inputs(T=4, dtype=torch.float32)
    with pytest.raises(ImportError, match="fla-core"):
        gated_delta_rule(q, k, v, g, beta, backend="fla")


# ----------------------------------------------------------------------------- causal conv1d


def hf_conv(x, weight, bias=None):
    D, W = weight.shape
    conv = torch.nn.Conv1d(D, D, W, groups=D, padding=W - 1, bias=bias is not None, dtype=x.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.unsqueeze(1))
        if bias is not None:
            conv.bias.copy_(bias)
        return F.silu(conv(x.transpose(1, 2))[..., : x.shape[1]]).transpose(1, 2)


def conv_inputs(B=2, T=13, D=5, W=4, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, D, generator=gen, dtype=dtype), torch.randn(D, W, generator=gen, dtype=dtype),
            torch.randn(D, generator=gen, dtype=dtype))


@pytest.mark.parametrize("use_bias", [False, True])
def test_conv_matches_hf_conv1d(use_bias):
    x, w, b = conv_inputs()
    b = b if use_bias else None
    y, S = causal_conv1d_ref(x, w, b, "silu", output_final_state=True)
    torch.testing.assert_close(y, hf_conv(x, w, b))
    torch.testing.assert_close(S, x[:, -3:].transpose(1, 2))  # last W-1 inputs
    y2, _ = causal_conv1d(x, w, b, "silu")  # CPU "auto" -> reference
    torch.testing.assert_close(y2, y)
    y_lin, _ = causal_conv1d_ref(x, w, b, None)
    torch.testing.assert_close(F.silu(y_lin), y)


def test_conv_packed_equals_per_document():
    lens = [5, 2, 9]  # the middle doc is shorter than W-1: its final state is zero-padded
    cu = torch.tensor([0, 5, 7, 16], dtype=torch.int32)
    x, w, b = conv_inputs(B=1, T=16)
    h0 = torch.randn(3, 5, 3)
    y, S = causal_conv1d(x, w, b, cu_seqlens=cu, output_final_state=True, backend="torch")
    y_h, S_h = causal_conv1d(x, w, b, cu_seqlens=cu, initial_state=h0, output_final_state=True)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        torch.testing.assert_close(y[:, s:e], hf_conv(x[:, s:e], w, b))
        y_n, S_n = causal_conv1d_ref(x[:, s:e], w, b, output_final_state=True)
        torch.testing.assert_close(S[n : n + 1], S_n)
        y_n, S_n = causal_conv1d_ref(x[:, s:e], w, b, initial_state=h0[n : n + 1], output_final_state=True)
        torch.testing.assert_close(y_h[:, s:e], y_n)
        torch.testing.assert_close(S_h[n : n + 1], S_n)
    assert torch.equal(S[1, :, 0], torch.zeros(5))  # zero history, no leakage from doc 0
    torch.testing.assert_close(S[1, :, 1:], x[0, 5:7].T)


@pytest.mark.parametrize("split", [1, 2, 7, 12])
def test_conv_state_chaining_equals_whole(split):
    x, w, b = conv_inputs(T=13)
    h0 = torch.randn(2, 5, 3)
    y, S = causal_conv1d_ref(x, w, b, initial_state=h0, output_final_state=True)
    y1, S1 = causal_conv1d_ref(x[:, :split], w, b, initial_state=h0, output_final_state=True)
    y2, S2 = causal_conv1d_ref(x[:, split:], w, b, initial_state=S1, output_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(S2, S)


def test_conv_validation_and_missing_backends():
    x, w, b = conv_inputs()
    with pytest.raises(ValueError):
        causal_conv1d(x, w, b, activation="gelu")
    with pytest.raises(ValueError):
        causal_conv1d(x, w, b, backend="nope")
    with pytest.raises(ValueError):  # packed input needs B == 1
        causal_conv1d(x, w, b, cu_seqlens=torch.tensor([0, 13]))


# ------------------------------------------------- fla code paths, exercised with stand-in modules


@pytest.fixture
def fake_fla(monkeypatch):
    """Install stand-in ``fla`` modules with fla's calling conventions, backed by the references."""
    import sys
    import types

    # (the package re-exports functions with the same names as these modules)
    conv_mod = importlib.import_module("nemo_qwen3_next.ops.causal_conv1d")
    gdr_mod = importlib.import_module("nemo_qwen3_next.ops.gated_delta_rule")

    calls = []

    def fla_gdr(ref):
        def fn(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
               use_qk_l2norm_in_kernel=False, cu_seqlens=None):
            assert q.shape[2] == k.shape[2] == v.shape[2], "dispatcher must expand grouped heads"
            assert cu_seqlens is None or cu_seqlens.dtype == torch.long
            calls.append(ref.__name__)
            return ref(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                       use_qk_l2norm=use_qk_l2norm_in_kernel)
        return fn

    def fla_conv(x, weight=None, bias=None, residual=None, initial_state=None, output_final_state=False,
                 activation=None, backend="triton", cu_seqlens=None, **kwargs):
        W = weight.shape[1]
        assert initial_state is None or initial_state.shape[-1] == W  # fla keeps a W-wide cache
        calls.append("conv")
        y, S = causal_conv1d_ref(x, weight, bias, activation, cu_seqlens=cu_seqlens,
                                 initial_state=None if initial_state is None else initial_state[..., 1:],
                                 output_final_state=output_final_state)
        if S is not None:  # column 0 of fla's cache is the input W steps back: never read
            S = torch.cat([torch.full_like(S[..., :1], float("nan")), S], dim=-1)
        return y, S

    ops = types.ModuleType("fla.ops.gated_delta_rule")
    ops.chunk_gated_delta_rule = fla_gdr(chunk_gated_delta_rule_ref)
    chunk_like = fla_gdr(recurrent_gated_delta_rule_ref)

    def fused_recurrent(q, k, v, g=None, gk=None, gv=None, beta=None, **kw):
        # fla-core 0.6's order: a positional beta would land in gk (per-key decay -> NaN on GPU)
        assert gk is None and gv is None and beta is not None, "pass fused_recurrent's gates by keyword"
        return chunk_like(q, k, v, g, beta, **kw)

    ops.fused_recurrent_gated_delta_rule = fused_recurrent
    conv = types.ModuleType("fla.modules.convolution")
    conv.causal_conv1d = fla_conv
    for name, mod in {"fla": types.ModuleType("fla"), "fla.ops": types.ModuleType("fla.ops"),
                      "fla.ops.gated_delta_rule": ops, "fla.modules": types.ModuleType("fla.modules"),
                      "fla.modules.convolution": conv, "causal_conv1d": None}.items():
        monkeypatch.setitem(sys.modules, name, mod)  # None blocks the causal_conv1d package
    for loader in (gdr_mod._load_fla, conv_mod._load_dao, conv_mod._load_fla_conv):
        loader.cache_clear()
    yield calls
    for loader in (gdr_mod._load_fla, conv_mod._load_dao, conv_mod._load_fla_conv):
        loader.cache_clear()


@pytest.mark.parametrize("use_recurrent", [False, True])
def test_fla_path_with_grouped_heads_and_varlen(fake_fla, use_recurrent):
    cu = torch.tensor([0, 5, 22, 32], dtype=torch.int32)
    q, k, v, g, beta, h0 = make_inputs(B=1, T=32, N=3, dtype=torch.float32, normalize=False)
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, use_qk_l2norm=True,
              use_recurrent=use_recurrent)
    o, S = gated_delta_rule(q, k, v, g, beta, backend="fla", **kw)
    o_ref, S_ref = gated_delta_rule(q, k, v, g, beta, backend="torch", **kw)
    assert fake_fla == ["recurrent_gated_delta_rule_ref" if use_recurrent else "chunk_gated_delta_rule_ref"]
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)


def test_fla_conv_path_state_width(fake_fla):
    cu = torch.tensor([0, 5, 7, 16])
    x, w, b = conv_inputs(B=1, T=16)
    h0 = torch.randn(3, 5, 3)
    kw = dict(cu_seqlens=cu, initial_state=h0, output_final_state=True)
    y, S = causal_conv1d(x, w, b, backend="fla", **kw)
    y_ref, S_ref = causal_conv1d_ref(x, w, b, **kw)
    assert fake_fla == ["conv"] and S.shape == h0.shape
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(S, S_ref)
    with pytest.raises(ImportError, match="causal-conv1d"):
        causal_conv1d(x, w, b, backend="causal_conv1d")


def test_usage_records_the_path_taken():
    """Training logs report which implementation ran; on CPU that is the torch reference."""
    from nemo_qwen3_next.ops import usage

    usage.reset()
    q, k, v, g, beta, _ = make_inputs(dtype=torch.float32)
    gated_delta_rule(q, k, v, g, beta)
    gated_delta_rule(q, k, v, g, beta, use_recurrent=True)
    x = torch.randn(2, 9, 4)
    causal_conv1d(x, torch.randn(4, 3), activation="silu")
    assert usage.kernels_used() == ["causal_conv1d:torch", "gated_delta_rule:torch_chunk",
                                    "gated_delta_rule:torch_recurrent"]
