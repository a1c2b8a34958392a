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
    """``step(tokens [1, B], positions [1, B]) -> logits [B, V]`` captured as a CUDA graph.

    Warm-up runs (kernel autotuning, lazy allocations) advance the state, so it is saved before and
    restored after them; capturing itself runs nothing.
    """

    def __init__(self, step, tokens: torch.Tensor, positions: torch.Tensor, state_tensors, warmup: int = 2):
        self.tokens, self.positions = tokens.clone(), positions.clone()
        saved = [t.clone() for t in state_tensors]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step(self.tokens, self.positions)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = step(self.tokens, self.positions)
        finally:  # also when capturing fails: the caller then runs the same step eagerly
            for t, s in zip(state_tensors, saved):
                t.copy_(s)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits
