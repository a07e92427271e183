"""bench.py runs end to end at a toy size and its ratios are what it says they are."""

import torch

import bench
from config import parse_config
from model import load_policy


def test_measure_reports_consistent_ratios(tiny_path):
    cfg = parse_config(bench.Config, ["--repeats", "1", "--prompts", "1", "--num_generations", "2",
                                      "--max_new_tokens_turn1", "4", "--max_new_tokens_turn2", "4"])
    policy = load_policy(tiny_path, torch.device("cpu"), torch.float32)  # its own copy: the bench updates it
    row = bench.measure("tiny", policy, cfg, torch.device("cpu"), torch.float32)
    assert row["rollout_overhead"] == row["rollout_s"] / row["plain_generate_s"]
    assert row["update_throughput"] == row["update_tokens_per_s"] / row["plain_tokens_per_s"]
    assert 0 < row["turn2_prefill_share"] < 1 and row["sampled_tokens_per_row"] <= 8


def test_logprob_memory_of_ours_is_below_naive():
    ratio, naive, ours = bench.logprob_memory_ratio(parse_config(bench.Config, ["--logprob_tokens", "512"]),
                                                    torch.device("cpu"))
    # naive holds logits and their fp32 log-softmax (2 x 512 x 151,936 x 4 bytes); ours those of one chunk of 110
    # rows (a fifth of that), whatever the number of tokens: issue 7's target is 0.3
    assert naive > 2 * 512 * bench.QWEN_VOCAB * 4 * 0.9 and ratio < 0.3
