"""Sharded loading and gather-once generation under torchrun (2 CPU ranks, gloo; tests/fsdp_sharded.py): the
weights each rank receives equal a plain `from_pretrained`, and `model.gathered` generates with no all-gather."""

import json
import re

import pytest

from tests.test_fsdp import torchrun
from demo.tiny import TINY_TEXT

MAX_NEW_TOKENS = 12  # tests/fsdp_sharded.py's greedy generate


@pytest.fixture(scope="module")
def ranks(tiny_path):
    done = torchrun("tests/fsdp_sharded.py", tiny_path, timeout=180)
    decode = json.JSONDecoder().raw_decode  # the two ranks' lines may run together on the shared stdout
    return {int(m[1]): decode(done.stdout, m.end())[0] for m in re.finditer(r"rank (\d) result ", done.stdout)}


@pytest.mark.parametrize("which, dtype, trainable", [("policy", "torch.float32", True),
                                                     ("reference", "torch.bfloat16", False)])
def test_sharded_loading_equals_from_pretrained(ranks, which, dtype, trainable):
    """Rank 0 read the checkpoint, rank 1 built the model on the meta device: both hold half of every weight, and
    the gathered weights, each rank's buffers (rotary inv_freq included), logits and greedy tokens equal a plain
    from_pretrained's. The KL reference is frozen and kept in the compute dtype (bf16 here)."""
    assert set(ranks) == {0, 1}
    for r in ranks.values():
        loaded = r[which]
        assert loaded["param_diffs"] == [] and loaded["buffer_diffs"] == [] and loaded["buffers"] == 4
        assert loaded["local_share"] == 0.5
        assert loaded["logits_diff"] == 0.0 and loaded["generate_equal"]
        assert loaded["trainable"] == trainable and loaded["dtypes"] == [dtype]


def test_gathered_generate_has_no_all_gathers(ranks):
    """Sharded, every decode step all-gathers every decoder layer; inside `gathered` each FSDP unit is gathered once
    on entry and generate gathers nothing, with the same tokens, while rank 0 stops after 2 tokens and rank 1 goes
    on. On exit the weights are sharded again and FSDP's reshard-after-forward is back (the root keeps its own)."""
    assert ranks[0]["lengths"] == [2, 2] and max(ranks[1]["lengths"]) > 2
    for r in ranks.values():
        units = r["units"]  # 2 decoder layers, 2 vision blocks, the vision tower, the root
        assert units == TINY_TEXT["num_hidden_layers"] + 2 + 1 + 1
        # the prefill gathers every unit but the root (kept after the previous forward), each further step the layers
        assert r["sharded_all_gathers"] == units - 1 + (MAX_NEW_TOKENS - 1) * TINY_TEXT["num_hidden_layers"]
        assert units - 1 <= r["entry_all_gathers"] <= units
        assert r["gathered_all_gathers"] == 0 and r["same_tokens"]
        assert r["resharded"] and r["forward_after_equal"]
        assert r["forward_all_gathers_after"] == units and r["second_forward_all_gathers"] == units - 1
