"""The decode step as one CUDA graph: replaying it costs one launch instead of hundreds.

At batch 1 a decode step of the reduced 80B-A3B model is a few hundred small kernels; launched one by
one from Python the GPU mostly waits for the host. The step has fixed shapes and addresses (the state
is pre-allocated and updated in place, the MoE routes without host syncs), so it is captured once per
(batch, cache length) and replayed with new token ids and positions copied into its input buffers.
The eager step (`inference.forward.forward`) is the reference: the same kernels, launched one by one.
"""

from __future__ import annotations

import torch


class GraphedStep:
    """``step(*inputs) -> outputs`` captured as a CUDA graph for fixed input shapes (the decode step:
    ``(tokens [1, B], positions [1, B]) -> logits [B, V]``; speculative verify and MTP drafting too).

    Warm-up runs (kernel autotuning, lazy allocations) may advance ``state_tensors``, so they are saved
    before and restored after them; capturing itself runs nothing. A replay copies its inputs into the
    captured ones and returns the graph's own output buffers (the next replay overwrites them).
    """

    def __init__(self, step, inputs, state_tensors=(), warmup: int = 2):
        self.inputs = [t.clone() for t in inputs]
        saved = [t.clone() for t in state_tensors]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = step(*self.inputs)
        finally:  # also when capturing fails: the caller then runs the same step eagerly
            for t, s in zip(state_tensors, saved):
                t.copy_(s)

    def __call__(self, *inputs: torch.Tensor):
        for static, t in zip(self.inputs, inputs, strict=True):
            static.copy_(t)
        self.graph.replay()
        return self.out
