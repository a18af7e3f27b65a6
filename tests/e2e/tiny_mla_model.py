"""Generate a tiny DeepSeek-V2-style (MLA) checkpoint: random bf16 weights, the same offline BPE tokenizer as
tests/e2e/tiny_model.py. No downloads; deterministic.

    python tests/e2e/tiny_mla_model.py DIR      # or: from tests.e2e.tiny_mla_model import make_tiny_mla

What SGLang sees is a ``DeepseekV2ForCausalLM`` whose attention is MLA at DeepSeek's own latent shapes:
``kv_lora_rank`` 512 + ``qk_rope_head_dim`` 64 = one 576-wide latent per token and layer (SGLang's MLA KV pool,
kvdrive's ``mla`` layout, the attention-mass kernel's 576-dim case), so the MLA code paths run at the shapes they
run at on a real DeepSeek. Everything else is small: 2 layers, hidden 256, 16 query heads (8 per rank at TP=2),
``q_lora_rank`` None (DeepSeek-V2-Lite's plain q_proj), vocab 1024.

Every layer is dense (``first_k_dense_replace`` = the layer count, so no MoE layer): this checkpoint is about the MLA
KV cache, and dense layers keep SGLang's fused-MoE kernels (and transformers' fused expert weight format, which
SGLang's loader does not read) out of the runs. ``moe=True`` makes the layers after the first MoE layers, for a
later run that wants them; it is not what the bench uses.
"""

from __future__ import annotations

import os
import sys

try:
    from .tiny_model import CONTEXT, SEED, save_greedy, write_tokenizer
except ImportError:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_model import CONTEXT, SEED, save_greedy, write_tokenizer

KV_LORA_RANK = 512
QK_ROPE_HEAD_DIM = 64
LATENT_DIM = KV_LORA_RANK + QK_ROPE_HEAD_DIM  # 576: the MLA KV pool's width per token
# YaRN RoPE as DeepSeek-V2 ships it (mscale 0.707), scaled from 1K to the 4K context: SGLang's CPU RoPE builds only
# DeepSeek's YaRN for MLA models (get_rope_cpu asserts rope_scaling, 0.5.17 and 0.5.23), and on a GPU the same config
# runs the same RoPE path a real DeepSeek-V2 runs.
ROPE_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 1024,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}


def make_tiny_mla(
    path: str | os.PathLike,
    *,
    num_layers: int = 2,
    hidden: int = 256,
    heads: int = 16,
    intermediate: int = 512,
    qk_nope_head_dim: int = 32,
    v_head_dim: int = 32,
    moe: bool = False,
    seed: int = SEED,
) -> str:
    """Write config, bf16 safetensors weights and tokenizer files into ``path`` (created if missing)."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    path = os.fspath(path)
    hf = write_tokenizer(path, seed)
    cfg = DeepseekV2Config(
        vocab_size=len(hf),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=CONTEXT,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        tie_word_embeddings=False,
        kv_lora_rank=KV_LORA_RANK,
        q_lora_rank=None,
        qk_rope_head_dim=QK_ROPE_HEAD_DIM,
        qk_nope_head_dim=qk_nope_head_dim,
        v_head_dim=v_head_dim,
        first_k_dense_replace=1 if moe else num_layers,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=intermediate // 2,
        topk_method="greedy",
        rope_parameters=dict(ROPE_YARN),
        # fields of DeepSeek's own config.json that transformers' DeepseekV2Config lacks and SGLang reads
        moe_layer_freq=1,
        scoring_func="softmax",
        n_group=1,
        topk_group=1,
        # wider than the usual 0.02: varied greedy outputs with clear top-1 margins (bf16 logits), as the tiny Llama
        initializer_range=0.2,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(cfg).to(torch.bfloat16)
    save_greedy(model, path)
    return path


if __name__ == "__main__":
    out = make_tiny_mla(sys.argv[1] if len(sys.argv) > 1 else "tiny-mla")
    print(out, sorted(os.listdir(out)))
