"""train_mgpo.py with checkpoints every step, where checkpoint-2 hangs (after creating a marker file) once its model
and optimizer shards are written but before it is complete, so that tests/test_reliability.py can kill the process
in the middle of a checkpoint write.

    python tests/slow_checkpoint.py OUTPUT_DIR MARKER_FILE
"""

import sys
import time

import torch.distributed.checkpoint as dcp

import train_mgpo
from config import parse_config
from tests.helpers import TINY_MGPO


SAVE = dcp.save


def slow_save(state, checkpoint_id, **kwargs):
    SAVE(state, checkpoint_id=checkpoint_id, **kwargs)
    if ".tmp-checkpoint-2" in str(checkpoint_id):
        open(sys.argv[2], "w").close()
        time.sleep(600)


if __name__ == "__main__":
    dcp.save = slow_save  # only inside this process
    cfg = parse_config(train_mgpo.Config, TINY_MGPO + ["--output_dir", sys.argv[1], "--max_steps", "3",
                                                       "--save_steps", "1", "--max_new_tokens_turn1", "8",
                                                       "--max_new_tokens_turn2", "4", "--num_synthetic", "16"])
    train_mgpo.train(cfg)
