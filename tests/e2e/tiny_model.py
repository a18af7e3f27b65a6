"""Generate a tiny Llama checkpoint for the end-to-end server tests: random bf16 weights, a byte-level BPE tokenizer
trained in-process on a generated corpus. No downloads; deterministic (fixed seeds, fixed corpus).

    python tests/e2e/tiny_model.py DIR          # or: from tests.e2e.tiny_model import make_tiny_llama

2 layers, hidden 128, 4 attention heads, 2 KV heads (head_dim 32), vocab 1024, context 4096; weights drawn with
initializer_range 0.2 so that greedy outputs vary with the prompt (a check of identical outputs means something).
"""

from __future__ import annotations

import json
import os
import random
import sys

SEED = 1234
VOCAB = 1024
CONTEXT = 4096

# Words used both for the tokenizer corpus and for the test prompts (tests.e2e.test_server_cpu.prompt()).
WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "be",
    "this",
    "from",
    "or",
    "have",
    "an",
    "they",
    "which",
    "one",
    "you",
    "had",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "been",
    "has",
    "more",
    "if",
    "no",
    "out",
    "do",
    "so",
    "up",
    "said",
    "time",
    "about",
    "other",
    "into",
    "than",
    "its",
    "only",
    "some",
    "could",
    "new",
    "them",
    "these",
    "two",
    "may",
    "first",
    "then",
    "any",
    "like",
    "my",
    "now",
    "over",
    "such",
    "our",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
    "cache",
    "page",
    "token",
    "memory",
    "disk",
    "store",
    "tier",
    "host",
    "device",
    "prefix",
    "radix",
    "tree",
    "evict",
    "restart",
    "server",
    "model",
    "layer",
    "head",
    "value",
    "key",
    "vector",
    "block",
    "segment",
    "index",
    "batch",
    "write",
    "read",
    "hash",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "river",
    "mountain",
    "forest",
    "ocean",
    "city",
    "garden",
    "library",
    "window",
    "engine",
    "signal",
    "orbit",
    "planet",
]


def corpus(n_lines: int = 600, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 24))]
        lines.append(f"{' '.join(words).capitalize()}. {i} {rng.randint(0, 99999)}")
    return lines


def write_tokenizer(path: str, seed: int = SEED):
    """Train the byte-level BPE tokenizer on the generated corpus and save it (with a chat template) into ``path``.
    Returns the Hugging Face tokenizer (for its special token ids and length)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    os.makedirs(path, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=seed), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=CONTEXT
    )
    hf.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    hf.save_pretrained(path)
    return hf


def save_greedy(model, path: str) -> None:
    """Save bf16 safetensors weights, with sampling defaults kept out of generation_config.json: greedy requests
    must be greedy."""
    model.save_pretrained(path, safe_serialization=True)
    gen_cfg = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_cfg):
        with open(gen_cfg) as f:
            g = json.load(f)
        for k in ("temperature", "top_p", "top_k", "do_sample"):
            g.pop(k, None)
        with open(gen_cfg, "w") as f:
            json.dump(g, f, indent=2)


def make_tiny_llama(
    path: str | os.PathLike,
    *,
    num_layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    seed: int = SEED,
) -> str:
    """Write config, bf16 safetensors weights and tokenizer files into ``path`` (created if missing)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.fspath(path)
    hf = write_tokenizer(path, seed)

    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate_size=intermediate,
        vocab_size=len(hf),
        max_position_embeddings=CONTEXT,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        # wider than the usual 0.02: varied greedy outputs with clear top-1 margins (bf16 logits)
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    save_greedy(model, path)
    return path


if __name__ == "__main__":
    out = make_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama")
    print(out, sorted(os.listdir(out)))
