"""The Llama decoder (Vicuna-7B/13B v1.5 in ViP-LLaVA), with a preallocated KV cache.

Quirks worth knowing:
- RMSNorm is computed in float32 and cast back before the weight multiplies (as in transformers);
- rotary embedding uses the "rotate half" layout of HF checkpoints (first half / second half of
  each head, not interleaved pairs), so q_proj/k_proj load as they are stored;
- one `input_pos` drives the cache write; positions come from the attention mask, so a
  left-padded row starts at position 0 on its first real token;
- without padding the causal path passes no mask tensor, so on CUDA SDPA can pick flash attention;
- `decode_step` is the same step with every shape fixed (the cache slot a tensor, attention over the
  whole cache under a mask), for torch.compile and CUDA graphs. How each product is made fast (and
  the int8/int4 layers that may replace the Linears) lives in quantize.py.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from quantize import Linear  # nn.Linear with measured CPU paths (see quantize.py)


@dataclass
class LlamaConfig:
    # Defaults are transformers' LlamaConfig class defaults: config.json stores only differences.
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        d = dict(d)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}  # transformers >= 5 writes rope_parameters
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise NotImplementedError(f"rope scaling {rope} is not supported: only plain RoPE (Llama-2 / Vicuna)")
        d.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {d['hidden_act']!r} is not supported: Llama uses silu")
        if d.get("tie_word_embeddings"):
            raise NotImplementedError("tied input/output embeddings are not supported: Vicuna has a separate lm_head")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class Embedding(nn.Embedding):
    """nn.Embedding whose random init is skipped on the meta device, where the loader overwrites it anyway:
    there `normal_` first imports sympy and torch's decompositions, 2 s of every load."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # in float32 even for fp16/bf16 activations, as the model was trained
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(c: LlamaConfig, n_pos: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions 0..n_pos-1, (n_pos, hs) in float32."""
    hs = c.head_dim
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, hs, 2, device=device).float() / hs))  # (hs/2,)
    freqs = torch.outer(torch.arange(n_pos, device=device).float(), inv_freq)  # (n_pos, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (n_pos, hs): the half-split layout
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):  # x (B, nh, T, hs); cos, sin (B, 1, T, hs)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache(nn.Module):
    """Keys and values for max_len positions, written in place: a decode step allocates no cache."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):  # k, v (B, nkv, T, hs) for positions pos..pos+T-1
        if isinstance(pos, torch.Tensor):  # (T,) slots, from decode_step: the whole cache, the same shape every step
            self.k.index_copy_(2, pos, k)
            self.v.index_copy_(2, pos, v)
            return self.k, self.v  # (B, nkv, max_len, hs); the caller's mask hides the slots not written yet
        end = pos + k.shape[2]
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, nkv, end, hs)


class SlotCache(KVCache):
    """The serving engine's cache (engine.py): one row per conversation slot, each filled to its own length.

    `where` is (rows, starts): the cache row of each sequence and the position its first new token takes.
    Prefill is one row, T tokens: it gets its row back as a view, (1, nkv, end, hs). A decode step is B rows,
    one token each, at different positions: each writes its own row and gets back a list of B views, one per
    row up to its own length, for attention row by row. (Gathering the rows into one masked batch measured
    7.5x slower on a CPU: 88 ms against 12 ms per layer for 8 rows of 620 positions, 7B widths.)
    """

    def update(self, where, k, v):  # k, v (B, nkv, T, hs)
        rows, starts = where
        if k.shape[0] == 1:
            r, end = rows[0], starts[0] + k.shape[2]
            self.k[r, :, starts[0]:end] = k[0]
            self.v[r, :, starts[0]:end] = v[0]
            return self.k[r:r + 1, :, :end], self.v[r:r + 1, :, :end]
        r, s = torch.tensor(rows, device=k.device), torch.tensor(starts, device=k.device)
        self.k[r, :, s] = k[:, :, 0]  # row r[b] at position s[b]
        self.v[r, :, s] = v[:, :, 0]
        return ([self.k[r:r + 1, :, :s + 1] for r, s in zip(rows, starts)],
                [self.v[r:r + 1, :, :s + 1] for r, s in zip(rows, starts)])


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos):  # input_pos: an int, or what the cache's update takes  # x (B, T, C)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, hs)
        gqa = self.n_kv_head != self.n_head
        if isinstance(k, list):  # a SlotCache decode step: each row attends to its own cache row, (1, nkv, S_b, hs)
            y = torch.cat([F.scaled_dot_product_attention(q[b:b + 1], k[b], v[b], enable_gqa=gqa) for b in range(B)])
        else:  # mask None: plain causal (prefill from position 0) or nothing to hide (one new token).
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=gqa)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, input_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(attention_mask, T: int, input_pos: int, device):
    """(B, S) padding mask over the whole sequence so far -> (B, 1, T, S) bool, or None if not needed."""
    S = input_pos + T
    if attention_mask is None or bool(attention_mask.all()):
        if input_pos == 0 or T == 1:
            return None  # plain causal attention (is_causal) or one query that sees everything
        attention_mask = torch.ones(1, S, dtype=torch.bool, device=device)
    keys = attention_mask.bool()[:, None, None, :S]  # (B, 1, 1, S)
    q_pos = torch.arange(input_pos, S, device=keys.device)[:, None]  # (T, 1) absolute query positions
    k_pos = torch.arange(S, device=keys.device)[None, :]  # (1, S)
    # Each position also sees itself, so a padding row's softmax is over something and stays
    # finite (its output is never used, but a NaN there would reach real rows through the cache).
    return (keys & (k_pos <= q_pos)) | (k_pos == q_pos)


class Llama(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.config = c
        self.model = nn.ModuleDict(dict(
            embed_tokens=Embedding(c.vocab_size, c.hidden_size),
            layers=nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers)),
            norm=RMSNorm(c.hidden_size, c.rms_norm_eps),
        ))
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        self._rope = None  # (cos, sin) tables, built on first use on the weights' device
        self.checkpointing = False  # activation checkpointing per decoder layer while training (finetune.py)

    def setup_cache(self, batch: int, max_len: int):
        """Preallocate keys/values for max_len positions; `remove_cache` frees them. An existing cache of that
        shape is kept; a shorter one of the same batch grows with its contents copied (a chat goes on in it)."""
        c, w = self.config, self.model.embed_tokens.weight  # (lm_head may be quantized)
        self.check_no_engine()
        if max_len > c.max_position_embeddings:
            raise ValueError(f"{max_len} positions exceed the model's context of {c.max_position_embeddings} tokens")
        cache = self.model.layers[0].self_attn.kv_cache
        same = type(cache) is KVCache and cache.k.dtype == w.dtype and cache.k.device == w.device
        if same and cache.k.shape == (batch, c.num_key_value_heads, max_len, c.head_dim):
            return  # a compiled decode_step replays its CUDA graph only on the same buffers
        grow = same and cache.k.shape[0] == batch and cache.k.shape[2] < max_len
        for layer in self.model.layers:  # one layer at a time: at most one layer's old and new buffers at once
            old = layer.self_attn.kv_cache
            layer.self_attn.kv_cache = KVCache(batch, c.num_key_value_heads, max_len, c.head_dim, w.dtype, w.device)
            if grow:
                n = old.k.shape[2]
                layer.self_attn.kv_cache.k[:, :, :n] = old.k
                layer.self_attn.kv_cache.v[:, :, :n] = old.v

    def setup_slots(self, n_slots: int, max_len: int):
        """A SlotCache of n_slots rows of max_len positions in every layer (engine.py); remove_cache frees it."""
        c, w = self.config, self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = SlotCache(n_slots, c.num_key_value_heads, max_len, c.head_dim, w.dtype, w.device)

    def check_no_engine(self):
        if isinstance(self.model.layers[0].self_attn.kv_cache, SlotCache):
            raise RuntimeError("an Engine (engine.py) holds this model's KV cache: generate and ChatSession cannot "
                               "run on the same model until engine.close()")

    def cache_length(self, batch: int) -> int:
        """Positions the KV cache holds for this batch size (0: no cache, or one for another batch)."""
        cache = self.model.layers[0].self_attn.kv_cache
        return cache.k.shape[2] if cache is not None and cache.k.shape[0] == batch else 0

    def remove_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def position_ids(self, attention_mask, T: int, input_pos: int):
        """(B, T) positions: a left-padded row counts from its first real token."""
        if attention_mask is None:
            return torch.arange(input_pos, input_pos + T, device=self.model.embed_tokens.weight.device)[None]
        pos = attention_mask.long().cumsum(-1) - 1  # (B, S)
        return pos[:, input_pos:input_pos + T].clamp(min=0)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, input_pos: int = 0,
                last_only: bool = False, head: bool = True):
        """Logits (B, T, vocab), or (B, 1, vocab) with last_only. attention_mask is (B, input_pos+T).
        head=False: the final-normed hidden states (B, T, C) instead, for a loss that needs lm_head at a few rows."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        T = x.shape[1]
        if self.model.layers[0].self_attn.kv_cache is None and input_pos:
            raise ValueError("input_pos > 0 needs a KV cache: call setup_cache first")
        if input_pos + T > self.config.max_position_embeddings:
            raise ValueError(f"{input_pos + T} tokens exceed the model's context of "
                             f"{self.config.max_position_embeddings}: shorten the prompt or max_new_tokens")
        self.build_rope(x.device)
        pos = self.position_ids(attention_mask, T, input_pos)  # (B, T)
        mask = attention_mask_4d(attention_mask, T, input_pos, x.device)
        return self.layers_and_head(x, pos, mask, input_pos, last_only, head)

    def build_rope(self, device):
        if self._rope is None or self._rope[0].device != device:
            self._rope = rope_tables(self.config, self.config.max_position_embeddings, device)

    def forward_rows(self, x, rows: list[int], starts: list[int]):
        """Logits (B, vocab) at the last position, through a SlotCache (engine.py): x (B, T, C) continues cache
        row rows[b] from position starts[b]. Either one row's prefill (B == 1) or a decode step (T == 1)."""
        B, T = x.shape[:2]
        self.build_rope(x.device)
        positions = torch.tensor(starts, device=x.device)[:, None] + torch.arange(T, device=x.device)  # (B, T)
        # One row: causal over its own cache (None: is_causal from 0, or one token that sees all). Several rows
        # (one token each) attend row by row to their own cache rows (SlotCache), with nothing to hide.
        mask = attention_mask_4d(None, T, starts[0], x.device) if B == 1 else None
        return self.layers_and_head(x, positions, mask, (rows, starts), last_only=True)[:, -1]

    def layers_and_head(self, x, positions, mask, input_pos, last_only: bool = False, head: bool = True):
        """The decoder layers, final norm and lm_head over x (B, T, C) at positions (B, T) -> logits (B, T, vocab)."""
        cos, sin = (t[positions].unsqueeze(1).to(x.dtype) for t in self._rope)  # (B, 1, T, hs)
        for layer in self.model.layers:
            if self.checkpointing and torch.is_grad_enabled():  # training: keep each layer's input, recompute the rest
                x = checkpoint(layer, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        return self.lm_head(x) if head else x  # (B, T, vocab) or (B, T, C)

    def decode_step(self, token, positions, input_pos, mask):
        """Logits (B, vocab) for one new token per row, with every shape fixed from step to step, so that
        torch.compile can capture the whole step in one CUDA graph (as gpt-fast does).

        token (B, 1); positions (B, 1) for RoPE; input_pos (1,) the cache slot; mask (B, 1, 1, max_len) bool:
        the slots each row may see. Attention reads the whole cache; the mask hides what is not written yet.
        """
        return self.layers_and_head(self.model.embed_tokens(token), positions, mask, input_pos)[:, -1]  # (B, vocab)
