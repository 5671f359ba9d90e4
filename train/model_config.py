"""Shapes of the built-in model (and of a tiny one for a CPU dry run), as transformers'
DeepseekV32Config. Shared by train.py and export.py."""

SHAPES = {
    # 23.9M parameters (15.1M active per token; 6.3M of them embedding and head): 6 layers,
    # the first dense, the rest MoE with 16 routed experts in 4 groups (top-2 groups, top-4
    # experts) plus one shared expert; MLA with q/kv LoRA; a lightning indexer that keeps 128
    # of up to 512 trained positions; YaRN (factor 4 over 512 positions: 2048 are served).
    "builtin": dict(
        hidden_size=384, num_hidden_layers=6, first_k_dense_replace=1,
        num_attention_heads=6, num_key_value_heads=6, q_lora_rank=256, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, intermediate_size=1024,
        moe_intermediate_size=128, n_routed_experts=16, n_group=4, topk_group=2,
        num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=2.5,
        index_n_heads=4, index_head_dim=64, index_topk=128,
        rope=dict(factor=4.0, original_max_position_embeddings=512, beta_fast=32, beta_slow=1,
                  mscale=1.0, mscale_all_dim=1.0),
        context=512,
    ),
    # For a CPU dry run of the scripts only.
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, first_k_dense_replace=1,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=48, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=128,
        moe_intermediate_size=32, n_routed_experts=8, n_group=4, topk_group=2,
        num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5,
        index_n_heads=2, index_head_dim=16, index_topk=16,
        rope=dict(factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                  mscale=1.0, mscale_all_dim=1.0),
        context=64,
    ),
}


def make_config(shape, vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2):
    from transformers import DeepseekV32Config

    spec = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    rope = dict(spec.pop("rope"))
    spec.pop("context", None)
    max_pos = int(rope["factor"] * rope["original_max_position_embeddings"])
    cfg = DeepseekV32Config(
        vocab_size=vocab_size, max_position_embeddings=max_pos, rms_norm_eps=1e-6,
        tie_word_embeddings=False, norm_topk_prob=True, hidden_act="silu",
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, **rope),
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        initializer_range=0.02, attention_bias=False, attention_dropout=0.0,
        **spec,
    )
    return cfg


def context_of(shape):
    return SHAPES[shape]["context"]
