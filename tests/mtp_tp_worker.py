"""torchrun worker: a NeMo Qwen3-Next checkpoint with an MTP block at TP = world size.

    torchrun --nproc-per-node 2 tests/mtp_tp_worker.py NEMO_DIR IDS.pt OUT.pt SAVE_DIR

Saves (rank 0) the full-sequence MTP logits and the tracked MTP loss of a forward with labels, and
saves the TP-sharded model with Megatron's own `dist_checkpointing.save` into SAVE_DIR (what a TP=2
training run writes), so the test can check the MTP tensors export from TP-split chunks.
"""

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(nemo_dir, ids_path, out_path, save_dir):
    from convert_tp2_worker import save_tp_sharded  # the sibling worker (this script's directory)

    from nemo_qwen3_next.modules.mtp import MTPLossTracker, hidden_before_final_norm, mtp_logits_reference
    from nemo_qwen3_next.nemo import load_nemo

    tp = int(os.environ["WORLD_SIZE"])
    model = load_nemo(nemo_dir, tp=tp, parallel_output=False).module.eval()
    ids = torch.load(ids_path)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    hidden = hidden_before_final_norm(model, ids)
    logits = mtp_logits_reference(model, hidden, torch.roll(ids, -1, 1))
    model.train()
    with torch.no_grad():
        model(ids, pos, None, labels=torch.roll(ids, -1, 1))
    mtp_loss = MTPLossTracker.pop()[0]
    if dist.get_rank() == 0:
        torch.save(dict(logits=logits, mtp_loss=mtp_loss), out_path)
    save_tp_sharded(model, save_dir)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
