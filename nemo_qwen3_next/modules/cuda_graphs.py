"""CUDA-graph replay of a mixer's training forward and backward (``config.mixer_cuda_graphs``).

At the usual micro-batch (B=1, T=4096) a Gated DeltaNet layer's kernels take ~2 ms on an H200 but the
layer takes ~5 ms: fla's and FlashQLA's autograd functions spend 0.2-1 ms of Python each on shape
checks, index building and ~60 launches. Both mixers (GDN and gated attention) have fixed shapes and
no host syncs on the fused path, so their forward and backward can be captured once per input shape
and replayed as two graph launches.

How it stays exact and safe:

* captured with ``torch.autograd.grad`` over leaf aliases of the mixer's parameters (same storage; see
  `_Graph.__init__` for why not the Parameters themselves; warm-up first, on a side
  stream, so Triton autotuning and TileLang compiles happen outside the capture); the replayed kernels
  are the eager ones, on the same inputs;
* the parameter gradients the backward graph writes are returned as copies: autograd may keep a
  returned gradient as ``param.grad`` and a later replay would overwrite it (gradient accumulation);
* one pending replay per graph: a second forward before the first one's backward (pipeline schedules,
  activation recompute, two micro-batches then two backwards) runs eagerly instead, because the graph's
  activations live in fixed memory;
* only where nothing else changes per call: training with autograd on, CUDA, one TP rank, no context
  parallelism, no packed sequences or dense masks, no recompute inside the mixer, no attention dropout.
  Anything else runs the eager path, and ``kernels_used()`` shows ``mixer_graphs:<why not>`` once.

The graphs read the parameters' storage: in-place updates (optimizer steps, ``load_state_dict``) are
seen; a parameter moved or replaced after capture (``.to()``, ``load_state_dict(assign=True)``) is
caught by comparing the mixer's current parameters' data pointers with the captured ones, and that
shape is captured again.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..ops.usage import record

MAX_SHAPES = 4  # graphs kept per mixer (each holds one step's activations for its shape)
# mixer -> its graphs; outside the module so state dicts, deepcopy and pickling never see a CUDA graph
_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def graphs_unsupported(mixer, x: torch.Tensor, *, attention_mask=None, packed_seq_params=None,
                       inference_context=None, recompute: bool = False) -> str:
    """Why this mixer call cannot be replayed from a CUDA graph ('' when it can)."""
    cfg = mixer.config
    if not getattr(cfg, "mixer_cuda_graphs", False):
        return "off"
    if not x.is_cuda:
        return "cpu"
    if not (mixer.training and torch.is_grad_enabled() and x.requires_grad):
        return "not training"
    if torch.cuda.is_current_stream_capturing():
        return "already capturing"
    if packed_seq_params is not None or attention_mask is not None or inference_context is not None:
        return "packed sequences, dense masks or inference"
    if mixer.pg_collection.tp.size() != 1 or getattr(cfg, "sequence_parallel", False):
        return "tensor parallelism"
    if getattr(mixer, "cp_group", None) is not None or mixer.pg_collection.cp.size() != 1:
        return "context parallelism"
    if recompute:
        return "recompute inside the mixer"
    if getattr(cfg, "attention_dropout", 0.0):
        return "attention dropout"
    return ""


class _Graph:
    """One captured forward + backward of ``fn(*inputs)`` for fixed input shapes, over ``module``'s
    parameters ``named`` (``[(name, Parameter)]``)."""

    def __init__(self, fn: Callable, inputs: Sequence[torch.Tensor], module: torch.nn.Module,
                 named: Sequence[Tuple[str, torch.nn.Parameter]], warmup: int = 2):
        from torch.nn.utils.stateless import _reparametrize_module

        self.ptrs = [p.data_ptr() for _, p in named]
        self.static_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        self.needs = [t.requires_grad for t in self.static_in]  # part of the cache key: fixed per graph
        # The capture differentiates leaf *aliases* of the parameters (same storage, so replays read the
        # current values), not the Parameters: Megatron's DDP keeps the Parameters' AccumulateGrad nodes
        # alive (its grad hooks), created on the default stream, and autograd syncs with that stream when a
        # gradient reaches them, which is illegal inside a capture (the capture failed under DDP / NeMo).
        aliases = {n: p.detach().requires_grad_(True) for n, p in named}
        diff = [t for t in self.static_in if t.requires_grad] + list(aliases.values())
        self.n_in_grad = sum(self.needs)

        def run(*args):
            with _reparametrize_module(module, aliases):
                return fn(*args)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # compiles, autotunes and allocator growth happen here, not in capture
                out = run(*self.static_in)
                torch.autograd.grad(out, diff, grad_outputs=torch.zeros_like(out), allow_unused=True)
            del out
        torch.cuda.current_stream().wait_stream(side)

        self.fwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd):
            self.static_out = run(*self.static_in)
        self.static_gout = torch.zeros_like(self.static_out)
        self.bwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.bwd, pool=self.fwd.pool()):
            grads = torch.autograd.grad(self.static_out, diff, grad_outputs=self.static_gout, allow_unused=True)
        self.static_grads = grads
        self.pending = False

    def valid(self, params: List[torch.nn.Parameter]) -> bool:
        """Whether the mixer's current parameters still live where the graph reads them (a `.to()` or an
        assigning `load_state_dict` moves or replaces them)."""
        return [p.data_ptr() for p in params] == self.ptrs


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph: _Graph, *args):
        inputs = args[: len(graph.static_in)]
        for static, t in zip(graph.static_in, inputs):
            if static.data_ptr() != t.data_ptr():
                static.copy_(t)
        graph.fwd.replay()
        graph.pending = True
        ctx.graph = graph
        return graph.static_out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        g = ctx.graph
        if g.static_gout.data_ptr() != gout.data_ptr():
            g.static_gout.copy_(gout)
        g.bwd.replay()
        g.pending = False
        in_grads = iter(g.static_grads[: g.n_in_grad])
        grads = [next(in_grads) if need else None for need in g.needs]
        # parameter grads are copied: autograd may keep the returned tensor as `.grad`
        grads += [None if t is None else t.clone() for t in g.static_grads[g.n_in_grad:]]
        return (None, *grads)


class MixerGraphs:
    """One mixer's captured graphs, keyed by input shapes, strides and dtypes."""

    def __init__(self):
        self._graphs: Dict[tuple, Optional[_Graph]] = {}  # None: capture failed for this key

    def __call__(self, fn: Callable, module: torch.nn.Module, *inputs: torch.Tensor) -> Optional[torch.Tensor]:
        """``fn(*inputs)`` replayed from a graph, or None where the caller must run eagerly."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        key = tuple((tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad) for t in inputs)
        if key in self._graphs and self._graphs[key] is None:
            return None
        g = self._graphs.get(key)
        if g is not None and not g.valid(params):
            del self._graphs[key], g  # parameters were re-allocated: capture again
            g = None
        if g is None:
            if len(self._graphs) >= MAX_SHAPES:
                record("mixer_graphs", f"eager: more than {MAX_SHAPES} input shapes")
                return None
            try:
                g = _Graph(fn, inputs, module, named)
            except RuntimeError as e:  # a host sync or an uncapturable op inside: stay eager for this shape
                self._graphs[key] = None
                record("mixer_graphs", f"eager: capture failed ({str(e).splitlines()[0][:120]})")
                return None
            self._graphs[key] = g
            record("mixer_graphs", "on")
        if g.pending:  # its activations are still needed by a backward that has not run
            record("mixer_graphs", "eager: second forward before backward")
            return None
        return _Replay.apply(g, *inputs, *params)


def graphed_or_none(mixer, fn: Callable, *inputs: torch.Tensor, **why_kwargs) -> Optional[torch.Tensor]:
    """Replay ``fn(*inputs)`` (a function of the inputs and the mixer's parameters) from the mixer's graph
    cache where `graphs_unsupported` allows, else None (run eagerly)."""
    why = graphs_unsupported(mixer, inputs[0], **why_kwargs)
    if why:
        if why != "off":
            record("mixer_graphs", f"eager: {why}")
        return None
    cache = _CACHES.get(mixer)
    if cache is None:
        cache = _CACHES[mixer] = MixerGraphs()
    return cache(fn, mixer, *inputs)
