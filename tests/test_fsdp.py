"""FSDP2 on CPU under torchrun: the 2-process update equals the single-process one on the same global batch, and
`torchrun ... train_mgpo.py` leaves a checkpoint that `from_pretrained` loads."""

import copy
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import torch
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

from grpo import grpo_update
from tests.helpers import ADVANTAGES, TINY_MGPO, small_rollout
from tests.fsdp_update import BUDGET_RUNS, UPDATE, make_optimizer, trajectories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*args, nproc=2, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def make_batch(policy):
    """8 two-turn trajectories (2 prompts x 4) and fixed advantages, as plain tensors and lists for torch.save."""
    trajs = small_rollout(policy, seed=2, sample_seed=9)
    return {"input_ids": [t.input_ids for t in trajs], "loss_mask": [t.loss_mask for t in trajs],
            "rollout_logprobs": [t.rollout_logprobs for t in trajs], "pixel_values": [t.pixel_values for t in trajs],
            "grids": [t.image_grid_thw for t in trajs],
            "advantages": torch.tensor(ADVANTAGES)}


def test_two_process_fsdp_update_equals_single_process(policy, tiny_path, tmp_path):
    """Plain and activation-checkpointed (each layer's MLP runs twice) 2-rank updates equal the 1-process one, and
    after micro-batch 1 of 2 each rank holds only its shard of the gradients (grpo.accumulate reduce-scatters
    every micro-batch); FSDP2's no-sync accumulation would hold the whole model's, which the probe must see."""
    model, tokenizer, _ = policy
    batch = make_batch(policy)
    trajs, advantages = trajectories(batch), batch["advantages"]
    torch.save(batch, tmp_path / "batch.pt")
    out = torchrun("tests/fsdp_update.py", tiny_path, str(tmp_path / "batch.pt"), str(tmp_path)).stdout
    params = sum(p.numel() for p in model.parameters())
    grads = re.findall(r"after micro-batch 1 of 2: sharded (\d+) of shard (\d+), unsharded (\d+)", out)
    assert len(grads) == 2 and all(g == s and u == "0" for g, s, u in grads), out
    assert sum(int(g) for g, _, _ in grads) == params  # the two halves, together the whole model once
    no_sync = re.findall(r"without gradient sync: sharded (\d+), unsharded (\d+)", out)
    assert [int(u) for _, u in no_sync] == [params, params], out
    assert out.count("plain: decoder 1.0 vision 1.0") == 2 and out.count("checkpointed: decoder 2.0 vision 2.0") == 2

    single = copy.deepcopy(model)
    optimizer = make_optimizer(single.parameters())
    # the same global mini-batch: 2 ranks x 4 trajectories = 8, in micro-batches of 2
    grpo_update(single, optimizer, trajs, advantages, tokenizer, SimpleNamespace(**{**UPDATE, "mini_batch_size": 8}),
                torch.device("cpu"), torch.float32)
    expected = single.state_dict()
    for name in ("plain", "checkpointed"):
        sharded = load_file(str(tmp_path / f"{name}.safetensors"))
        assert sharded.keys() <= expected.keys() and len(sharded) >= len(list(single.parameters()))
        worst = max((sharded[k] - expected[k]).abs().max().item() for k in sharded)
        assert worst < 1e-5, (name, worst)
        moved = max((sharded[k] - model.state_dict()[k]).abs().max().item() for k in sharded)
        assert moved > 1e-4


def test_two_process_token_budget_update_equals_single_process(policy, tiny_path, tmp_path):
    """Trajectory i ends 7 - i tokens early (their last 8 tokens are sampled): rank 0 holds the 4 shortest, rank 1
    the 4 longest, and a budget of 4 x the 4th shortest packs rank 0's into one micro-batch and rank 1's into 2.
    Rank 0 then runs a zero-weight pass to match rank 1's count (it must, or rank 1 hangs in a reduce-scatter), and
    both updates (token-mean; seq-mean over 2 epochs) equal the 1-process one with one micro-batch."""
    model, tokenizer, _ = policy
    batch = make_batch(policy)
    for key in ("input_ids", "loss_mask", "rollout_logprobs"):
        batch[key] = [row[:len(row) - (7 - i)] for i, row in enumerate(batch[key])]
    lengths = [len(ids) for ids in batch["input_ids"]]
    assert lengths == sorted(lengths) and lengths[7] > lengths[3]
    torch.save(batch, tmp_path / "batch.pt")
    out = torchrun("tests/fsdp_update.py", tiny_path, str(tmp_path / "batch.pt"), str(tmp_path), str(4 * lengths[3]),
                   timeout=120).stdout
    for name, overrides in BUDGET_RUNS.items():
        found = re.findall(rf"rank (\d) {name} packed (\d+) passes (\d+)", out)
        counts = {rank: (int(k), int(p)) for rank, k, p in found}
        assert counts == {"0": (1, 2), "1": (2, 2)}, out
        single = copy.deepcopy(model)
        cfg = SimpleNamespace(**{**UPDATE, **overrides, "mini_batch_size": 8, "micro_batch_size": 8})
        grpo_update(single, make_optimizer(single.parameters()), trajectories(batch), batch["advantages"], tokenizer,
                    cfg, torch.device("cpu"), torch.float32)
        expected = single.state_dict()
        sharded = load_file(str(tmp_path / f"{name}.safetensors"))
        worst = max((sharded[k] - expected[k]).abs().max().item() for k in sharded)
        assert worst < 1e-5, (name, worst)
        assert max((sharded[k] - model.state_dict()[k]).abs().max().item() for k in sharded) > 1e-4


def test_sharded_generate_when_ranks_stop_at_different_steps(tiny_path):
    done = torchrun("tests/fsdp_generate.py", tiny_path, timeout=120)
    lengths = {rank: json.loads(ids) for rank, ids in re.findall(r"rank (\d) lengths (\[[^\]]*\])", done.stdout)}
    assert lengths["0"] == [2, 2]
    assert max(lengths["1"]) > 2  # rank 1 went on decoding after rank 0 had finished
    assert done.stdout.count("cache fits sequences True") == 2  # rank 0's extra forwards are cut off its cache
    second = dict(re.findall(r"rank (\d) second turn lengths (\[[^\]]*\])", done.stdout))
    assert set(second) == {"0", "1"}  # both ranks continued from their caches (to 4 and 8 tokens: out of step)


def test_torchrun_train_mgpo_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "out"
    torchrun("train_mgpo.py", *TINY_MGPO, "--data", "synthetic", "--max_steps", "2", "--output_dir", str(out),
             "--max_new_tokens_turn1", "16", "--max_new_tokens_turn2", "8")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out / "checkpoint-2"))
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out / "tiny-init"))
    assert model.state_dict().keys() == initial.state_dict().keys()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_torchrun_lfpc_stage1_then_stage2(tmp_path):
    """Episodes end after different numbers of rounds on each rank; a finished rank keeps joining generate."""
    small = ["--max_steps", "2", "--num_synthetic", "16", "--max_new_tokens_per_turn", "12"]
    torchrun("train_lfpc.py", "--stage", "1", "--output_dir", str(tmp_path / "s1"), *small)
    torchrun("train_lfpc.py", "--stage", "2", "--model", str(tmp_path / "s1" / "checkpoint-2"),
             "--output_dir", str(tmp_path / "s2"), *small)
    Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "s2" / "checkpoint-2"))
    rows = [json.loads(line) for line in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "grounding_r_geo" in rows[0]


def test_torchrun_sharded_checkpoint_resumes_on_one_process(tmp_path):
    """2 ranks (with a sharded KL reference) write checkpoint-2 as 2 shard files; a single process resumes from it
    and trains step 3 (the metrics of steps 1-2 are kept)."""
    import train_mgpo
    from config import parse_config
    out = tmp_path / "out"
    args = [*TINY_MGPO, "--output_dir", str(out), "--kl_coef", "0.01", "--learning_rate", "1e-3",
            "--max_new_tokens_turn1", "8", "--max_new_tokens_turn2", "4", "--num_synthetic", "16"]
    torchrun("train_mgpo.py", *args, "--max_steps", "2")
    assert sorted(os.listdir(out / "checkpoint-2" / "dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    train_mgpo.train(parse_config(train_mgpo.Config, args + ["--max_steps", "3", "--resume", "true"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the random tiny model earns no reward, so the policy stays at the reference: a KL of exactly 0 says that the
    # sharded reference (2 ranks), the resumed policy and the reference (1 process) give the same log-probs
    assert [r["kl"] for r in rows] == [0.0, 0.0, 0.0] and all(r["grad_norm"] == 0 for r in rows)
    Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out / "checkpoint-3"))
