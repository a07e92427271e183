"""Small shared pieces of the tests."""

from types import SimpleNamespace

import torch

from rollout import mgpo_rollout
from demo.synthetic import synthetic_samples

# train_mgpo.py's defaults run the CPU demo; most tests want the random tiny model at the old small sizes
TINY_MGPO = ["--model", "tiny", "--batch_size", "4", "--num_generations", "4", "--micro_batch_size", "4",
             "--learning_rate", "1e-6", "--max_steps", "10", "--eval_samples", "0"]

ADVANTAGES = [1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -1.0, -1.0]  # fixed, one per trajectory of `small_rollout`


def small_rollout(policy, seed, sample_seed):
    """8 two-turn MGPO trajectories (2 synthetic prompts x 4) at small pixel budgets, sampled with `seed`."""
    model, tokenizer, image_processor = policy
    cfg = SimpleNamespace(global_max_pixels=112 * 112, crop_max_pixels=56 * 56, min_pixels=784,
                          max_new_tokens_turn1=16, max_new_tokens_turn2=8, temperature=1.0, rollout_batch_size=0,
                          min_box_side=28, do_sample=True, probe="none")
    torch.manual_seed(seed)
    return mgpo_rollout(model, tokenizer, image_processor, synthetic_samples(2, seed=sample_seed), 4, cfg)
