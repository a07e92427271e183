"""memory.py's ledger, the real model configs and the recipe files, checked against published parameter counts,
counted activations, the issue's measured 7B peaks, and peaks measured in a real CPU run (device_check.py --small)."""

import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import memory
import memory_sizes
from config import parse_config
from config import check_config
from family import QWEN2_5_VL, QWEN3_5, QWEN3_VL, family_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))


# published sizes (the model cards: 3.75B, 8.29B, 33.5B, 73.4B parameters)
@pytest.mark.parametrize("size, billions", [("3b", 3.75), ("7b", 8.29), ("32b", 33.5), ("72b", 73.4)])
def test_configs_build_the_published_parameter_counts(size, billions):
    config = Qwen2_5_VLConfig.from_json_file(os.path.join(ROOT, "configs", f"qwen2_5_vl_{size}.json"))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e9, 2 if size == "3b" or size == "7b" else 1) == billions
    assert memory.parameter_counts(config)["total"] == total
    assert config.vision_config.depth == 32 and config.vision_config.hidden_size == 1280


def test_7b_config_facts():
    config = memory.load_model_config(os.path.join(ROOT, "configs", "qwen2_5_vl_7b.json"))
    counts = memory.parameter_counts(config)
    t = config.text_config
    assert round(counts["layer"] * t.num_hidden_layers / 1e9, 2) == 6.53  # DESIGN.md: 6.53B in decoder layers
    assert 2 * t.num_hidden_layers * t.num_key_value_heads * 128 * 2 == 56 * 1024  # 56 KiB of KV per token
    assert not config.tie_word_embeddings and t.vocab_size == 152_064
    assert memory.load_model_config(os.path.join(ROOT, "configs", "qwen2_5_vl_3b.json")).tie_word_embeddings


def saved_bytes(module, *args, **kwargs):
    """Bytes of the distinct tensors autograd saves in a forward of `module`, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*args, **kwargs)
    return sum(seen.values())


def test_activation_formulas_match_counted_saved_tensors():
    # a width the formulas were not fitted at (H 384, I 1,280, 6 heads of 64, 2 KV heads; vision 192 / 448)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=384, intermediate_size=1280, num_hidden_layers=1, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
        vision_config=dict(depth=1, hidden_size=192, intermediate_size=448, num_heads=6, out_hidden_size=384))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    tokens = 96
    x = torch.randn(1, tokens, 384, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens)[None]
    rotary = model.model.language_model.rotary_emb(x, positions[None].expand(3, 1, tokens))
    layer = model.model.language_model.layers[0]
    measured = saved_bytes(layer, x, position_embeddings=rotary, attention_mask=None, position_ids=positions)
    assert measured / tokens == pytest.approx(memory_sizes.lm_token_bytes(config.text_config), rel=0.02)
    patches = 256
    v = torch.randn(patches, 192, dtype=torch.bfloat16, requires_grad=True)
    cos_sin = (torch.ones(patches, 32), torch.zeros(patches, 32))
    measured = saved_bytes(model.model.visual.blocks[0], v, cu_seqlens=torch.tensor([0, patches], dtype=torch.int32),
                           position_embeddings=cos_sin)
    assert measured / patches == pytest.approx(memory_sizes.vision_patch_bytes(config.vision_config), rel=0.02)
    # the issue's figures at 7B widths, measured with FSDPMemTracker: 225 KB per token per layer, 66.5 KB per patch
    seven = memory.load_model_config(os.path.join(ROOT, "configs", "qwen2_5_vl_7b.json"))
    assert memory_sizes.lm_token_bytes(seven.text_config) / 1000 == pytest.approx(225, rel=0.01)
    assert memory_sizes.vision_patch_bytes(seven.vision_config) / 1000 == pytest.approx(66.5, rel=0.01)


@pytest.mark.parametrize("checkpointing, measured_gib", [(False, 57), (True, 21)])
def test_update_matches_the_issues_7b_measurement(checkpointing, measured_gib):
    """The issue measured (FSDPMemTracker, fake tensors, 8 fake ranks) one micro-batch of 2 x 2,000 tokens with two
    1,000-token images at 7B: about 57 GiB without checkpointing, 21 GiB with it (no rollout, no accumulation)."""
    from train_mgpo import Config
    config = memory.load_model_config(os.path.join(ROOT, "configs", "qwen2_5_vl_7b.json"))
    n = memory.parameter_counts(config)
    cfg = Config(micro_batch_size=2, gradient_checkpointing=checkpointing)
    lines = memory.update_lines(cfg, config, n, n["total"], 8, {"tokens": 2000, "patches": 4000}, checkpointing,
                                True, 2)
    predicted = memory.total(lines) + 3 * n["total"] * 4 / 8  # + fp32 shard and AdamW's two moments
    assert predicted / memory.GiB == pytest.approx(measured_gib, rel=0.2)


def recipe_config(path):
    from train_lfpc import Config as LFPCConfig
    from train_mgpo import Config as MGPOConfig
    cls = MGPOConfig if os.path.basename(path).startswith("mgpo") else LFPCConfig
    return parse_config(cls, ["--config", path, "--model", "/models/qwen", "--data", "train.jsonl"])


def test_recipe_set_is_complete():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"mgpo_qwen2_5_vl_7b.yaml", "mgpo_qwen2_5_vl_3b.yaml", "lfpc_stage1_qwen2_5_vl_7b.yaml",
            "lfpc_stage2_qwen2_5_vl_7b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipes_parse_check_and_fit_8x80gb(path):
    cfg = recipe_config(path)
    extra = []
    if hasattr(cfg, "stage"):
        from train_lfpc import extra_checks
        extra = extra_checks(cfg)
    check_config(cfg, 8, extra)  # stops the run on a bad combination
    assert cfg.batch_size // 8 * cfg.num_generations == 512  # the papers' 512 trajectories per rank
    config = memory.load_model_config(memory.model_config_path(path))
    after = memory.predict(cfg, config, 8, "after")
    assert all(memory.total(lines) <= 75 * memory.GiB for lines in after.values())
    assert memory.peak_gib(memory.predict(cfg, config, 8, "before")) > 80
    assert memory.main(["--config", path, "--as_of", "after"]) == 0
    assert memory.main(["--config", path]) == 0  # both columns: the status is the after column's
    assert memory.main(["--config", path, "--as_of", "before"]) == 1


def test_paper_settings_in_recipes():
    mgpo = recipe_config(os.path.join(ROOT, "recipes", "mgpo_qwen2_5_vl_7b.yaml"))
    assert (mgpo.learning_rate, mgpo.kl_coef, mgpo.clip_eps_low, mgpo.global_max_pixels) == (1e-6, 0.01, 0.2, 1003520)
    assert memory_sizes.visual_tokens_per_image(mgpo.global_max_pixels, QWEN2_5_VL) == 1280
    s1 = recipe_config(os.path.join(ROOT, "recipes", "lfpc_stage1_qwen2_5_vl_7b.yaml"))
    s2 = recipe_config(os.path.join(ROOT, "recipes", "lfpc_stage2_qwen2_5_vl_7b.yaml"))
    assert (s1.stage, s1.learning_rate, s2.stage, s2.learning_rate) == (1, 1e-6, 2, 5e-7)  # Table 12
    assert (s1.batch_size, s1.num_generations, s1.max_response_tokens, s1.max_turns) == (256, 16, 2048, 5)
    assert memory_sizes.visual_tokens_per_image(s1.global_max_pixels, QWEN2_5_VL) == 16384


def test_command_line_overrides_a_recipe():
    path = os.path.join(ROOT, "recipes", "mgpo_qwen2_5_vl_7b.yaml")
    assert memory.main(["--config", path, "--as_of", "after", "--rollout_batch_size", "512"]) == 1  # 512 rows of KV


def test_device_check_small_cpu_run_matches_the_ledger():
    """A real run (FSDP2 in one process, bf16 compute, 2 MGPO steps) whose peaks, measured with torch's MemTracker,
    are within 20% of the ledger's (device_check exits 1 otherwise)."""
    out = subprocess.run([sys.executable, "device_check.py", "--small", "--steps", "2", "--gradient_checkpointing",
                          "false"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "peak rollout" in out.stdout and "peak update" in out.stdout and "ms/token" in out.stdout


def test_chunk_rows_by_hand():
    # rollout.chunks: whole groups when rollout_batch_size >= G, else a slice of one group (or of two)
    g16 = lambda size: memory.chunk_rows(SimpleNamespace(rollout_batch_size=size, num_generations=16), 512)  # noqa
    assert [g16(s) for s in (16, 20, 40, 4, 6, 12, 0)] == [(16, 1), (16, 1), (32, 2), (4, 1), (6, 2), (12, 2),
                                                            (512, 32)]
    assert memory.chunk_rows(SimpleNamespace(rollout_batch_size=4, num_generations=16), 512, after=False) == (512, 32)


def test_lfpc_rounds_continue_and_micro_batches_by_hand():
    """LFPC's budgets: 16,384 + 5 x 4,096 visual, 512 + 5 x 64 text and 2,048 sampled tokens = 39,744. The last
    round prefills 64 + 4,096 tokens on 35,584 cached; re-encoding (before issue 23) prefilled all 39,744."""
    cfg = recipe_config(os.path.join(ROOT, "recipes", "lfpc_stage1_qwen2_5_vl_7b.yaml"))
    shape = memory.trajectory_calls(cfg, QWEN2_5_VL)
    assert shape["tokens"] == 39_744 and shape["shortest"] == 512 + 16_384 + 1
    first, last = shape["calls"]
    assert first == dict(cached=0, new=512 + 16_384, new_patches=4 * 16_384, shared=True)
    assert last == dict(cached=39_744 - 4_160, new=4_160, new_patches=4 * 4_096, shared=False)
    assert memory.trajectory_calls(cfg, QWEN2_5_VL, continued=False)["calls"][1]["new"] == 39_744
    # the update's micro-batch: micro_batch_size x the longest, or a token budget: 40,960 fits 2 of the shortest
    # (2 x 16,897), and at most 4 patches per token
    budget = lambda n: SimpleNamespace(max_tokens_per_micro_batch=n, micro_batch_size=1)  # noqa: E731
    assert memory.micro_batch_shape(budget(0), shape, QWEN2_5_VL) == (39_744, 4 * (16_384 + 5 * 4_096))
    assert memory.micro_batch_shape(budget(40_960), shape, QWEN2_5_VL) == (40_960, 4 * 40_960)
    alone = memory.micro_batch_shape(budget(10_000), shape, QWEN2_5_VL)  # one trajectory longer than the budget
    assert alone == (39_744, 4 * (16_384 + 5 * 4_096))
    # the KV cache at 12 rows: 12 x 39,744 tokens x 56 KiB, before the last round's call and at its end (x 29/28)
    prediction = memory.predict(cfg, memory.load_model_config(memory.model_config_path(
        "lfpc_stage1_qwen2_5_vl_7b.yaml")), 8)
    assert prediction["rollout: prefill"]["KV cache (before the call and its prefill)"] == 12 * 39_744 * 56 * 1024
    assert prediction["rollout: decode"]["KV cache (whole trajectories)"] == pytest.approx(
        12 * 39_744 * 56 * 1024 * 29 / 28)


def test_rollout_prefills_what_the_ledger_says(policy):
    """The ledger's calls, measured on a real MGPO rollout (2 prompts x G 4): the first prefill runs the 2 distinct
    prompts (memory.chunk_rows' `distinct`), all but their last token; turn 2's runs the 8 rows (`rows`) on turn 1's
    cache, over the new user turn only (its longest, plus the last sampled token, never fed before)."""
    from tests.helpers import small_rollout
    model = policy[0]
    prefills = []

    def record(module, args):
        rows, columns = args[0].shape[:2]  # the hidden states entering the first decoder layer
        if columns > 1:  # a decode step feeds one column
            prefills.append((rows, columns))

    hook = QWEN2_5_VL.language_model(model).layers[0].register_forward_pre_hook(record)
    try:
        trajs = small_rollout(policy, seed=0, sample_seed=2)
    finally:
        hook.remove()
    rows, distinct = memory.chunk_rows(SimpleNamespace(rollout_batch_size=0, num_generations=4), 8)
    first_prompt = max(t.loss_mask.index(1) for t in trajs)
    user_turn2 = [next(i for i, m in enumerate(t.loss_mask) if i > t.loss_mask.index(1) and m == 0) for t in trajs]
    new = [t.loss_mask.index(1, start) - start for t, start in zip(trajs, user_turn2)]
    assert prefills == [(distinct, first_prompt - 1), (rows, max(new) + 1)]


QWEN3_5_27B = os.path.join(ROOT, "configs", "qwen3_5_27b.json")


def tiny_qwen3_5(layer_types, hidden=112, intermediate=200, key_heads=2, value_heads=6, key_dim=16, value_dim=20,
                 heads=4, kv_heads=2, head=64, kernel=4):
    """A bf16 Qwen3.5 of the given widths (vision tower of one block), built from its config class."""
    from transformers import Qwen3_5Config
    config = Qwen3_5Config(
        text_config=dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=len(layer_types),
                         layer_types=layer_types, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head, linear_num_key_heads=key_heads, linear_num_value_heads=value_heads,
                         linear_key_head_dim=key_dim, linear_value_head_dim=value_dim, linear_conv_kernel_dim=kernel,
                         vocab_size=300, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                          "partial_rotary_factor": 0.25, "mrope_interleaved": True,
                                                          "mrope_section": [head // 16, head // 32, head // 32]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=hidden),
        image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return QWEN3_5.model_class(config).to(torch.bfloat16)


def test_qwen3_5_27b_config_loads_round_trips_and_builds():
    from transformers import Qwen3_5Config
    with open(QWEN3_5_27B) as f:
        written = json.load(f)
    config = memory.load_model_config(QWEN3_5_27B)
    assert family_of(config) is QWEN3_5
    back = Qwen3_5Config.from_json_file(QWEN3_5_27B).to_dict()  # every key kept, none rewritten
    for part in ("text_config", "vision_config"):
        assert {k: back[part][k] for k in written[part]} == written[part]
    assert {k: back[k] for k in ("image_token_id", "video_token_id", "tie_word_embeddings")} == \
        {k: written[k] for k in ("image_token_id", "video_token_id", "tie_word_embeddings")}
    t = config.text_config
    kinds = memory_sizes.layer_kinds(t)
    assert kinds == (["linear_attention"] * 3 + ["full_attention"]) * 16  # full attention every 4th layer
    assert memory_sizes.layer_kinds(t).count("full_attention") == 16 and memory_sizes.head_dim(t) == 256 != 5120 // 24
    assert memory_sizes.kv_token_bytes(t) == 2 * 16 * 4 * 256 * 2 == 64 * 1024  # by hand: 16 layers, 4 KV heads of 256
    # 48 layers x (conv 10,240 channels x 4 columns bf16 + 48 x 128 x 128 fp32)
    assert memory_sizes.linear_state_bytes(t) == 48 * ((2 * 16 * 128 + 48 * 128) * 4 * 2 + 48 * 128 * 128 * 4)
    assert 27.0 < memory.parameter_counts(config)["total"] / 1e9 < 28.0  # the name's 27B (MTP head not built)


def test_hybrid_cache_bytes_match_what_transformers_allocates():
    """A prefill of 3 rows x 11 tokens through 3 Gated DeltaNet and 1 full-attention layer: the bytes of every tensor
    in the returned cache = rows x (tokens x kv_token_bytes + linear_state_bytes)."""
    model = tiny_qwen3_5(["linear_attention"] * 3 + ["full_attention"], kernel=3).eval()
    rows, tokens = 3, 11
    with torch.no_grad():
        cache = model(input_ids=torch.randint(0, 280, (rows, tokens)), use_cache=True).past_key_values
    measured = 0
    for layer in cache.layers:
        states = [*getattr(layer, "conv_states", {}).values(), *getattr(layer, "recurrent_states", {}).values(),
                  getattr(layer, "keys", None), getattr(layer, "values", None)]
        measured += sum(s.numel() * s.element_size() for s in states if isinstance(s, torch.Tensor))
    assert {s.dtype for s in cache.layers[0].recurrent_states.values()} == {torch.float32}  # fp32 in a bf16 model
    t = model.config.text_config
    assert measured == rows * (tokens * memory_sizes.kv_token_bytes(t) + memory_sizes.linear_state_bytes(t))


def test_qwen3_5_activation_formulas_match_counted_saved_tensors():
    """Widths the formulas were not fitted at; 192 tokens = 3 chunks of the Gated DeltaNet's 64."""
    tokens = 192
    for kind, formula in (("linear_attention", memory_sizes.gated_delta_token_bytes),
                          ("full_attention", memory_sizes.gated_attention_token_bytes)):
        model = tiny_qwen3_5([kind], hidden=176, intermediate=288, key_heads=3, value_heads=6, key_dim=24,
                             value_dim=12, heads=6, kv_heads=3, head=32)
        lm = QWEN3_5.language_model(model)
        x = torch.randn(1, tokens, 176, dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(tokens)[None]
        rotary = lm.rotary_emb(x, positions[None].expand(3, 1, tokens))
        measured = saved_bytes(lm.layers[0], x, position_embeddings=rotary, attention_mask=None,
                               position_ids=positions)
        assert measured / tokens == pytest.approx(formula(model.config.text_config), rel=0.02), kind
    per_layer = memory_sizes.layer_token_bytes(memory.load_model_config(QWEN3_5_27B).text_config)
    assert per_layer[:4] == [775_979] * 3 + [365_016]


def test_patching_follows_the_family():
    # Qwen3-VL's recipe: 1,310,720 px = 1,280 tokens of 32 x 32 px (not 1,671 of 28 x 28); rows of 3 x 2 x 16 x 16
    assert memory_sizes.visual_tokens_per_image(1_310_720, QWEN3_VL) == 1_310_720 // (32 * 32) == 1280
    assert memory_sizes.visual_tokens_per_image(1_310_720, QWEN2_5_VL) == 1671
    assert (memory_sizes.patch_values(QWEN3_VL), memory_sizes.patch_values(QWEN2_5_VL)) == (1536, 1176)
    cfg = recipe_config(os.path.join(ROOT, "recipes", "mgpo_qwen3_vl_8b.yaml"))
    assert memory.trajectory_calls(cfg, QWEN3_VL)["tokens"] == 512 + 1280 + 8192 + 64 + 1280 + 8192


def test_recurrent_family_shares_the_first_prompt_and_re_encodes_the_last_call():
    """Qwen3.5 on the Qwen3-VL MGPO recipe: turn 1 prefills 512 + 1,280 tokens once per group; turn 2 re-encodes
    512 + 1,280 + 8,192 + 64 + 1,280 tokens and both images for every row, with no cache before it."""
    cfg = recipe_config(os.path.join(ROOT, "recipes", "mgpo_qwen3_vl_8b.yaml"))
    first, last = memory.trajectory_calls(cfg, QWEN3_5, continued=False)["calls"]
    assert first == dict(cached=0, new=512 + 1280, new_patches=4 * 1280, shared=True)
    assert last == dict(cached=0, new=512 + 1280 + 8192 + 64 + 1280, new_patches=4 * 2560, shared=False)
    config = memory.load_model_config(QWEN3_5_27B)
    prediction = memory.predict(cfg, config, 8)
    rows, t = 8, config.text_config  # rollout_batch_size 8: one group of G 8 per call
    assert prediction["rollout: prefill"]["KV cache (before the call and its prefill)"] == \
        rows * (last["new"] * 64 * 1024 + memory_sizes.linear_state_bytes(t))
