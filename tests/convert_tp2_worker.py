"""torchrun worker: load a NeMo Qwen3-Next checkpoint at TP=world size and save the logits.

    torchrun --nproc-per-node 2 tests/convert_tp2_worker.py NEMO_DIR IDS.pt OUT.pt [SAVE_DIR]

With SAVE_DIR, the TP-sharded model is also saved there with Megatron's own
`dist_checkpointing.save` (a checkpoint as a TP=2 training run writes it), so the test can check
that export reads TP-split checkpoints.
"""

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(nemo_dir, ids_path, out_path, save_dir=None):
    from nemo_qwen3_next.nemo import load_nemo

    tp = int(os.environ["WORLD_SIZE"])
    model = load_nemo(nemo_dir, tp=tp, parallel_output=False)
    ids = torch.load(ids_path)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        logits = model.module.eval()(ids, pos, None)
    if dist.get_rank() == 0:
        torch.save(logits, out_path)
    if save_dir:
        save_tp_sharded(model.module, save_dir)
    dist.barrier()
    dist.destroy_process_group()


def save_tp_sharded(module, save_dir):
    """The TP-sharded model saved with Megatron's own `dist_checkpointing.save`, keys as NeMo writes them."""
    from megatron.core import dist_checkpointing

    from nemo_qwen3_next.nemo.convert import NEMO_SHARDED_METADATA, PREFIX

    sharded = module.sharded_state_dict(prefix=PREFIX, metadata=dict(NEMO_SHARDED_METADATA))
    if dist.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded, save_dir, content_metadata=dict(NEMO_SHARDED_METADATA))


if __name__ == "__main__":
    main(*sys.argv[1:5])
