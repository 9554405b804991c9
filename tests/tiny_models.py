"""Tiny random models (built from configs only, no hub access) for the attnswap model-family tests.

``tiny_config(family)`` / ``tiny_model(family, attn_implementation="eager", seed=0)`` build a small fp32 model
in eval mode; ``left_padded_batch(vocab)`` gives a batch where one row is left-padded.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import transformers as T

PAD = 0
VOCAB = 128
MAX_POS = 64
WINDOW = 4  # sliding/local windows, small enough that a 14-token input exercises them

# ``falcon`` uses rotary embeddings; ``falcon_alibi`` is the alibi variant.
FAMILIES = [
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma2",
    "phi3",
    "gpt2",
    "gpt_neox",
    "gpt_oss",
    "bert",
    "gpt_neo",
    "falcon",
    "falcon_alibi",
]

ENCODER_FAMILIES = {"bert"}
DECODER_FAMILIES = [f for f in FAMILIES if f not in ENCODER_FAMILIES]

# Families whose model class accepts attn_implementation="sdpa" (checked by test_tiny_models_build).
SDPA_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gpt2", "gpt_neox", "bert", "falcon", "falcon_alibi"]

# Unsupported (no attnswap patch) and attention-free models, for the error tests.
UNSUPPORTED_FAMILIES = ["bloom"]

_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=None, initializer_range=0.2)


def _gqa(hidden=32, layers=2, heads=4, kv=2, **kw):
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=MAX_POS,
        **kw,
    )


def tiny_config(family: str):
    """A tiny config of ``family`` (see FAMILIES, plus "bloom" and "mamba")."""
    if family == "llama":
        cfg = T.LlamaConfig(**_gqa(), **_COMMON)
    elif family == "qwen2":
        cfg = T.Qwen2Config(**_gqa(), **_COMMON)
    elif family == "qwen3":
        cfg = T.Qwen3Config(**_gqa(head_dim=8), **_COMMON)
    elif family == "mistral":
        cfg = T.MistralConfig(**_gqa(head_dim=8, sliding_window=WINDOW), **_COMMON)
    elif family == "gemma2":
        cfg = T.Gemma2Config(
            **_gqa(
                head_dim=8,
                layers=3,
                sliding_window=WINDOW,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                # small caps so softcapping actually bends the scores of a tiny random model
                attn_logit_softcapping=2.0,
                final_logit_softcapping=10.0,
                query_pre_attn_scalar=8,
            ),
            **_COMMON,
        )
    elif family == "phi3":
        cfg = T.Phi3Config(**_gqa(), **_COMMON)
    elif family == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POS, **_COMMON)
    elif family == "gpt_neox":
        cfg = T.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_POS,
            **_COMMON,
        )
    elif family == "gpt_oss":
        cfg = T.GptOssConfig(
            **_gqa(
                head_dim=8,
                sliding_window=WINDOW,
                layer_types=["sliding_attention", "full_attention"],
                num_local_experts=4,
                num_experts_per_tok=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            **_COMMON,
        )
    elif family == "bert":
        cfg = T.BertConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_POS,
            **_COMMON,
        )
    elif family == "gpt_neo":
        cfg = T.GPTNeoConfig(
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=WINDOW,
            max_position_embeddings=MAX_POS,
            **_COMMON,
        )
    elif family in ("falcon", "falcon_alibi"):
        alibi = family == "falcon_alibi"
        cfg = T.FalconConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            # rotary: the new decoder architecture with grouped KV heads; alibi: the classic multi-query one
            new_decoder_architecture=not alibi,
            num_kv_heads=2 if not alibi else None,
            multi_query=alibi,
            alibi=alibi,
            parallel_attn=True,
            bias=alibi,
            max_position_embeddings=MAX_POS,
            **_COMMON,
        )
    elif family == "bloom":
        cfg = T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **_COMMON)
    elif family == "mamba":
        cfg = T.MambaConfig(hidden_size=32, state_size=4, num_hidden_layers=2, vocab_size=VOCAB, pad_token_id=PAD)
    else:
        raise KeyError(f"no tiny config for family {family!r}")
    cfg.tie_word_embeddings = False
    return cfg


def model_class(family: str):
    if family in ENCODER_FAMILIES:
        return T.AutoModelForMaskedLM
    return T.AutoModelForCausalLM


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tiny_model(family: str, attn_implementation: str = "eager", seed: int = 0):
    """A tiny random fp32 model of ``family`` in eval mode; same ``seed`` gives the same weights."""
    cfg = tiny_config(family)
    seed_everything(seed)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = model_class(family).from_config(cfg, dtype=torch.float32, **kw)
    if family == "gpt_oss":
        # Random router/expert init leaves some params near zero; give experts a visible contribution.
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 1)
            for name, p in model.named_parameters():
                if "experts" in name and p.dtype.is_floating_point:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def num_attention_layers(model) -> int:
    cfg = model.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, name, None)
        if isinstance(n, int):
            return n
    raise AttributeError("no layer count in config")


def left_padded_batch(vocab: int = VOCAB, batch: int = 3, seq: int = 14, pad: int = 4, seed: int = 0):
    """``input_ids`` (batch, seq) and ``attention_mask``; row 1 is left-padded by ``pad`` tokens (id PAD)."""
    g = torch.Generator().manual_seed(1000 + seed)
    input_ids = torch.randint(2, vocab, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    row = 1 if batch > 1 else 0
    input_ids[row, :pad] = PAD
    attention_mask[row, :pad] = 0
    return input_ids, attention_mask


def logits(model, ids, mask=None):
    """The model's logits for ``ids`` (and an attention mask), without gradients."""
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def gqa_inputs(seed=0, b=2, n=9, m=11, d=16):
    """Random query (b, 4, n, d), key and value (b, 2, m, d): four query heads on two KV heads."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, n, d, generator=g), torch.randn(b, 2, m, d, generator=g),
            torch.randn(b, 2, m, d, generator=g))
