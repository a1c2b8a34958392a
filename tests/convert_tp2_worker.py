"""torchrun worker: load a NeMo Qwen3-Next checkpoint at TP=world size and save the logits.

    torchrun --nproc-per-node 2 tests/convert_tp2_worker.py NEMO_DIR IDS.pt OUT.pt
"""

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(nemo_dir, ids_path, out_path):
    from nemo_qwen3_next.nemo import load_nemo

    tp = int(os.environ["WORLD_SIZE"])
    model = load_nemo(nemo_dir, tp=tp, parallel_output=False)
    ids = torch.load(ids_path)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        logits = model.module.eval()(ids, pos, None)
    if dist.get_rank() == 0:
        torch.save(logits, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
