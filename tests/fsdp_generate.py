"""generate on an FSDP2-sharded model when ranks finish at different steps (torchrun, CPU, gloo).

    torchrun --nproc_per_node 2 tests/fsdp_generate.py TINY_DIR

Rank 0's rows all stop after 2 tokens, rank 1's run to the limit: without synced decoding rank 0 would leave
generate early and rank 1 would wait forever in an all-gather. Prints each rank's sampled lengths, whether the
turn's KV cache covers exactly its sequences (rank 0's generate ran forwards past its stop), and the lengths of a
second turn continued from that cache (the new image's features from the sharded vision tower).
"""

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

import generation
import rollout
from family import QWEN2_5_VL
from model import load_policy, shard_model
from demo.synthetic import synthetic_samples


class StopEarlyOnRankZero(generation.StopAtPattern):
    def __call__(self, input_ids, scores, **kwargs):
        if dist.get_rank() == 0 and input_ids.shape[1] - self.prompt_len >= 2:
            for row in range(input_ids.shape[0]):
                self.stop_at.setdefault(row, 2)
        return torch.tensor([row in self.stop_at for row in range(input_ids.shape[0])])


def main(tiny_dir):
    dist.init_process_group("gloo")
    generation.StopAtPattern = StopEarlyOnRankZero
    model, tokenizer, image_processor = load_policy(tiny_dir, torch.device("cpu"), torch.float32)
    model = shard_model(model, torch.float32)
    sample = synthetic_samples(1, seed=dist.get_rank())[0]
    traj, _ = rollout.start_trajectory(sample, tokenizer, image_processor, QWEN2_5_VL, "system", "question",
                                       112 * 112, 784)
    trajs = [rollout.fork(traj) for _ in range(2)]
    outs, turn = generation.generate_turn(model, tokenizer, generation.prompt_batch(model, tokenizer, trajs),
                                       max_new_tokens=12, stop_pattern=generation.JSON_BLOCK_END)
    print(f"rank {dist.get_rank()} lengths {[len(ids) for ids, _ in outs]}", flush=True)
    fits = turn.past_key_values.get_seq_length() == turn.sequences.shape[1] - 1
    print(f"rank {dist.get_rank()} cache fits sequences {fits}", flush=True)
    for t, (sampled, logprobs) in zip(trajs, outs):
        rollout.append_sampled(t, sampled, logprobs, tokenizer)
        rollout.append_user_turn(t, tokenizer, image_processor, ["again:", t.images[0]])
    outs, _ = rollout.generate_for(model, tokenizer, trajs, 4 + 4 * dist.get_rank(),
                                   SimpleNamespace(temperature=1.0, do_sample=True), after=turn)
    print(f"rank {dist.get_rank()} second turn lengths {[len(ids) for ids, _ in outs]}", flush=True)
    dist.barrier()  # teardown together: gloo aborted rank 0 once when it left before rank 1 (CI, 2 cores)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
