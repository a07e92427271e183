"""Sizes per token, per patch and per row of a model config: what memory.py's ledger multiplies by its counts.

    >>> kv_token_bytes(load_model_config("configs/qwen2_5_vl_7b.json").text_config)  # memory.load_model_config
    57344

Decoder layers come in kinds (`layer_kinds`): full attention everywhere in Qwen2.5-VL and Qwen3-VL; in Qwen3.5 three
of every four are Gated DeltaNet (linear attention), whose cache is a fixed state per row, not keys and values per
token. Activation sizes were counted with `saved_tensors_hooks` (tests/test_memory.py recounts them at widths the
formulas were not fitted at); Qwen3.5's are transformers' torch fallback's.
"""

TEMPORAL_PATCH = 2  # an image is repeated over the vision tower's 2 frames
CHUNK = 64          # the Gated DeltaNet's chunk length (transformers' torch fallback, fla's kernels)


def visual_tokens_per_image(max_pixels, family):
    """Visual tokens of an image filling `max_pixels`: factor x factor pixels per token (Qwen2.5-VL: 14-px patches,
    2 x 2 merge, 28 x 28; Qwen3-VL and Qwen3.5: 32 x 32). 1,003,520 -> 1,280 (MGPO); 12,845,056 -> 16,384 (the
    processor's default, LFPC's view); Qwen3-VL's 1,310,720 -> 1,280."""
    return max_pixels // family.factor ** 2


def patch_values(family):
    """Values of one pixel_values row: RGB x 2 frames x patch x patch (Qwen2.5-VL 1,176; Qwen3-VL, Qwen3.5 1,536)."""
    return 3 * TEMPORAL_PATCH * family.patch_size ** 2


def patches_per_token(family):
    """Vision patches merged into one visual token (2 x 2 in every family)."""
    return family.merge_size ** 2


def head_dim(t):
    """The attention head's width: the config's head_dim where it sets one (Qwen3-VL, Qwen3.5: 24 heads of 256 at
    hidden 5,120), else hidden / heads (Qwen2.5-VL)."""
    return getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads


def layer_kinds(t):
    """Each decoder layer's kind: 'full_attention' or 'linear_attention' (Qwen3.5's Gated DeltaNet, 3 of every 4).
    The model builds layer i from layer_types[i], so a config cut to fewer layers keeps the first kinds."""
    return list(getattr(t, "layer_types", None) or ["full_attention"] * t.num_hidden_layers)[:t.num_hidden_layers]


def is_hybrid(t):
    return "linear_attention" in layer_kinds(t)


def kv_token_bytes(t, dtype_bytes=2):
    """Keys and values of one token over the full-attention layers: 2 x layers x KV heads x head_dim x 2 B.
    Qwen2.5-VL-7B: 2 * 28 * 4 * 128 * 2 = 56 KiB; Qwen3.5-27B: 2 * 16 * 4 * 256 * 2 = 64 KiB."""
    return 2 * layer_kinds(t).count("full_attention") * t.num_key_value_heads * head_dim(t) * dtype_bytes


def linear_state_bytes(t, dtype_bytes=2):
    """A row's fixed cache in the linear-attention layers, whatever its length (transformers' LinearAttentionLayer):
    the convolution state, (q, k, v channels) x kernel in the model's dtype, and the gated-delta recurrent state,
    value heads x key dim x value dim in fp32. Qwen3.5-27B: 48 x ((2 * 16 * 128 + 48 * 128) * 4 * 2 B
    + 48 * 128 * 128 * 4 B) = 48 x 3.08 MiB = 148 MiB per row."""
    if not is_hybrid(t):
        return 0
    nk, nv, dk, dv = t.linear_num_key_heads, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim
    conv = (2 * nk * dk + nv * dv) * t.linear_conv_kernel_dim * dtype_bytes
    return layer_kinds(t).count("linear_attention") * (conv + nv * dk * dv * 4)


def lm_token_bytes(t):
    """Bytes a decoder layer saves for backward per token, in bf16 (some in fp32: the RMSNorm inputs). Counted with
    saved_tensors_hooks at three widths; exact for all three: 225,912 B at 7B (H 3,584, I 18,944). Qwen2.5-VL's
    layer; Qwen3-VL's (q/k norms) is estimated with it."""
    head = head_dim(t)
    return 20 * t.hidden_size + 8 * t.intermediate_size + 4 * t.num_key_value_heads * head + 4 * head \
        + 4 * t.num_attention_heads + 8


def gated_attention_token_bytes(t):
    """The same for Qwen3.5's full-attention layer (output gate, q/k norms in fp32, partial rotary): counted at nine
    widths, exact. 365,016 B at 27B (H 5,120, I 17,408, 24 heads and 4 KV heads of 256)."""
    heads, kv, head = t.num_attention_heads, t.num_key_value_heads, head_dim(t)
    return 20 * t.hidden_size + 8 * t.intermediate_size + 18 * heads * head + 12 * kv * head + head \
        + 8 * heads + 4 * kv + 8


def gated_delta_token_bytes(t):
    """The same for a Gated DeltaNet layer on transformers' torch fallback (`torch_chunk_gated_delta_rule`): fp32
    copies of q, k (repeated to the value heads) and v, five C x C matrices per chunk and head, and the fp32
    recurrent state at each chunk's start. Counted at ten widths, exact (sequence a multiple of C = 64).
    775,979 B at 27B (16 key heads and 48 value heads of 128). flash-linear-attention's kernels (on GPU) save
    other tensors: this is the fallback's figure."""
    nk, nv, dk, dv = t.linear_num_key_heads, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim
    return 20 * t.hidden_size + 8 * t.intermediate_size + 8 * nk * dk + 32 * nv * dk + 34 * nv * dv \
        + nv * (20 * CHUNK + 38) + 4 * nv * (dk * dv + 1) // CHUNK + 8


def layer_token_bytes(t):
    """Saved bytes per token of each decoder layer, in order: the ledger sums them, or takes the largest."""
    if not is_hybrid(t):
        return [lm_token_bytes(t)] * t.num_hidden_layers
    return [gated_delta_token_bytes(t) if kind == "linear_attention" else gated_attention_token_bytes(t)
            for kind in layer_kinds(t)]


def vision_patch_bytes(v):
    """Bytes a vision block saves for backward per patch, in bf16; counted as above: 66,472 B at 1,280 / 3,420."""
    return int(30.5 * v.hidden_size) + 8 * v.intermediate_size + 4 * v.num_heads + 8


def inference_token_bytes(t):
    """Transient bytes per token of a no-grad decoder layer (prefill): the MLP's act(gate), up and their product,
    and a few hidden-sized tensors (residual, norm in fp32). A Gated DeltaNet layer's chunked rule holds more: fp32
    q, k, v and the chunk matrices, fitted to MemTracker peaks at twelve widths (torch fallback, within 6%):
    405,504 B at Qwen3.5-27B against the MLP's 165,888."""
    mlp = 6 * t.intermediate_size + 12 * t.hidden_size
    if not is_hybrid(t):
        return mlp
    nv, dk, dv = t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim
    return max(mlp, 22 * nv * dk + 17 * nv * dv + 14 * nv * CHUNK + 10 * nv * dk * dv // CHUNK)


def inference_patch_bytes(v):
    """The same for a no-grad vision block: the MLP's three intermediates, qkv and the fp32 rotary copies."""
    return 6 * v.intermediate_size + 16 * v.hidden_size
