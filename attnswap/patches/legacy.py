"""Class patches for families whose attention does not route through transformers' AttentionInterface.

A swap replaces one method on the *instance* (never the class), so restoring is deleting that attribute. For
``attn_implementation="attnswap_<kind>"`` at load time, each family's table of attention classes also gets a
subclass with the method built in.
"""

from __future__ import annotations

import importlib
import types

import torch

from ..dispatch import run
from ..kinds.visibility import Visibility, gqa_mask
from .interface import implementation_name, routes_through_interface, spec_of, wants_weights
from .masks import model_visibility


def _gpt_neo_forward(self, hidden_states, attention_mask=None, layer_past=None, use_cache=False,
                     output_attentions=False, **kwargs):
    """GPTNeoSelfAttention.forward with the attention swapped: no score scaling; local layers see the last
    ``window_size`` keys; causal aligned lower-right; projections and cache as the model."""
    spec = spec_of(self, getattr(self, "_attnswap_kind", None))
    query = self._split_heads(self.q_proj(hidden_states), self.num_heads, self.head_dim)
    key = self._split_heads(self.k_proj(hidden_states), self.num_heads, self.head_dim)
    value = self._split_heads(self.v_proj(hidden_states), self.num_heads, self.head_dim)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_id)
    b, h, n, _ = query.shape
    m = key.shape[2]
    window = self.config.window_size if self.attention_type == "local" else None
    mask = None if attention_mask is None else gqa_mask(attention_mask[..., :m], b, h, key.shape[1], n, m)
    vis = Visibility(n=n, m=m, causal=True, offset=m - n, window=window, mask=mask)
    out, weights = run(spec.kind, spec.options, query, key, value, vis, scaling=1.0,
                       dropout=self.attn_dropout.p if self.training else 0.0,
                       need_weights=bool(output_attentions) or wants_weights(self, kwargs), impl=spec.impl,
                       module=self)
    out = self.resid_dropout(self.out_proj(self._merge_heads(out, self.num_heads, self.head_dim)))
    return out, weights


def _falcon_forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None,
                    use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
    """FalconAttention.forward with the attention itself swapped; the projections, rotary and cache as the model."""
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    spec = spec_of(self, getattr(self, "_attnswap_kind", None))
    fused_qkv = self.query_key_value(hidden_states)
    num_kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    query, key, value = self._split_heads(fused_qkv)
    b, n = query.shape[:2]
    query = query.transpose(1, 2).reshape(b, self.num_heads, n, self.head_dim)
    key = key.transpose(1, 2).reshape(b, num_kv_heads, n, self.head_dim)
    value = value.transpose(1, 2).reshape(b, num_kv_heads, n, self.head_dim)
    if alibi is None:
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    m = key.shape[2]
    native_sdpa = self.config._attn_implementation == "sdpa" and not output_attentions
    mask = attention_mask
    if alibi is not None and not native_sdpa:
        # the model's eager path adds ALiBi to the scores on top of the mask (which already carries it)
        bias = alibi.view(b, self.num_heads, 1, m).float() * self.inv_norm_factor
        base = mask if mask is not None else torch.zeros((), device=query.device)
        mask = torch.where(base > torch.finfo(base.dtype).min / 2, base.float() + bias,
                           torch.tensor(torch.finfo(torch.float32).min, device=query.device))
    vis = model_visibility(mask, query, key, is_causal=self.is_causal, native=self.config._attn_implementation)
    dropout = self.attention_dropout.p if (self.training and alibi is not None) else 0.0
    out, weights = run(spec.kind, spec.options, query, key, value, vis, scaling=self.inv_norm_factor,
                       dropout=dropout, need_weights=bool(output_attentions) or wants_weights(self, kwargs), impl=spec.impl,
                       module=self)
    out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
    return self.dense(out), weights


# exact class (module path + name) -> (method name, replacement); subclasses (e.g. flash variants) are not covered.
# A transformers release that moves a family onto the AttentionInterface (Falcon in 5.25) makes its patch unused:
# the interface path swaps it then.
PATCHES = {
    "transformers.models.gpt_neo.modeling_gpt_neo.GPTNeoSelfAttention": ("forward", _gpt_neo_forward),
    "transformers.models.falcon.modeling_falcon.FalconAttention": ("forward", _falcon_forward),
}
FAMILIES = ("falcon", "gpt_neo")


# where each family picks its attention class by implementation name, so attn_implementation="attnswap_<kind>"
# works at load time too
CLASS_TABLES = {
    "transformers.models.gpt_neo.modeling_gpt_neo": ("GPT_NEO_ATTENTION_CLASSES", "GPTNeoSelfAttention"),
    "transformers.models.falcon.modeling_falcon": ("FALCON_ATTENTION_CLASSES", "FalconAttention"),
}


def _qualified(cls) -> str:
    return getattr(cls, "_attnswap_base", f"{cls.__module__}.{cls.__qualname__}")


def patch_for(module) -> tuple[str, callable] | None:
    patch = PATCHES.get(_qualified(type(module)))
    if patch is None or routes_through_interface(type(module)):
        return None
    return patch


def register_loadable(kind_name: str) -> None:
    """Add ``attnswap_<kind>`` to the legacy families' class tables: a subclass with the patch built in."""
    for module_name, (table_name, base_name) in CLASS_TABLES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a transformers without this family
            continue
        base = getattr(module, base_name)
        if not hasattr(module, table_name) or routes_through_interface(base):  # the family is on the interface
            continue
        method, fn = PATCHES[_qualified(base)]
        loadable = type(f"Attnswap{base.__name__}", (base,), {
            method: fn, "_attnswap_kind": kind_name, "_attnswap_base": _qualified(base),
            "__module__": __name__,
        })
        getattr(module, table_name)[implementation_name(kind_name)] = loadable


def apply(module, name: str, fn) -> None:
    setattr(module, name, types.MethodType(fn, module))


def remove(module, name: str) -> None:
    module.__dict__.pop(name, None)


