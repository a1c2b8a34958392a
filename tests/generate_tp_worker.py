"""torchrun worker: generation at TP = WORLD_SIZE (CPU, gloo) on the tiny HF model's weights.

Writes the greedy and the seeded-sampling outputs of `test_generate._left_padded()`'s batch.
Usage: torchrun --nproc-per-node 2 tests/generate_tp_worker.py OUT.pt
"""

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from test_generate import _left_padded  # noqa: E402
from tp_worker import tiny_tp_model  # noqa: E402


def main(out_path: str):
    from nemo_qwen3_next.inference import generate

    model, _, rank = tiny_tp_model(sp=False)
    ids, mask = _left_padded()
    out = dict(greedy=generate(model, ids, 16, attention_mask=mask),
               sampled=generate(model, ids, 16, attention_mask=mask, temperature=1.0, top_k=20, seed=7))
    if rank == 0:
        torch.save(out, out_path)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
