"""The CLIP ViT vision tower (ViT-L/14 at 336 px in ViP-LLaVA), written for VipLlava.

Quirks worth knowing:
- the checkpoint spells the LayerNorm before the encoder `pre_layrnorm` (sic); we keep the name;
- hidden state 0 is the output of `pre_layrnorm`, hidden state i the output of encoder layer i,
  as in transformers' `hidden_states` tuple, so negative indices count from the last layer;
- VipLlava reads layers [-2, -5, -8, -11, 6], so the forward stops at the deepest one it is asked
  for: the last encoder layer and `post_layernorm` are loaded but never run.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama import Embedding
from quantize import Linear, cpu_computes  # Linear: nn.Linear with measured CPU paths

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # what CLIP was trained with
    "gelu": F.gelu,  # exact (erf) GELU, VipLlava's projector
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r} in config.json; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass
class CLIPVisionConfig:
    # Defaults are transformers' CLIPVisionConfig class defaults (ViT-B/32): config.json stores
    # only the fields that differ from them.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Attention(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.n_head = c.num_attention_heads
        self.q_proj = Linear(c.hidden_size, c.hidden_size)
        self.k_proj = Linear(c.hidden_size, c.hidden_size)
        self.v_proj = Linear(c.hidden_size, c.hidden_size)
        self.out_proj = Linear(c.hidden_size, c.hidden_size)

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs), no mask: every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.fc1 = Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = Linear(c.intermediate_size, c.hidden_size)
        self.act = activation(c.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = Attention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x):  # pre-norm residual blocks
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(c.hidden_size))
        if not self.class_embedding.is_meta:  # CLIP's init; on meta it would cost 2 s of imports (see Embedding)
            nn.init.normal_(self.class_embedding, std=c.hidden_size**-0.5)
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.position_embedding = Embedding(c.num_patches + 1, c.hidden_size)

    def forward(self, pixel_values):  # (B, 3, H, W)
        w = self.patch_embedding.weight
        x = pixel_values.to(w.dtype)
        if x.device.type == "cpu" and not cpu_computes(w.dtype):  # without fast bf16 kernels: 40x slower (as Linear)
            x = F.conv2d(x.float(), w.float(), stride=self.patch_embedding.stride).to(w.dtype)  # (B, C, H/p, W/p)
        else:
            x = self.patch_embedding(x)  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C), patches in row-major order
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, C)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, N+1, C)


class CLIPVisionTower(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.config = c
        self.vision_model = nn.ModuleDict(dict(
            embeddings=Embeddings(c),
            pre_layrnorm=nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(EncoderLayer(c) for _ in range(c.num_hidden_layers)))),
            post_layernorm=nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps),  # unused by VipLlava
        ))

    def forward(self, pixel_values, layers: list[int]) -> list[torch.Tensor]:
        """Hidden states `layers` (transformers' indexing, negatives allowed), each (B, N+1, C)."""
        n = self.config.num_hidden_layers + 1  # number of hidden states: pre_layrnorm + every layer
        for i in layers:
            if not -n <= i < n:
                raise ValueError(f"vision feature layer {i} does not exist: the vision tower has {n} hidden states")
        wanted = [i % n for i in layers]
        m = self.vision_model
        x = m.pre_layrnorm(m.embeddings(pixel_values))
        states = [x]
        for layer in m.encoder.layers[: max(wanted)]:  # stop at the deepest layer asked for
            x = layer(x)
            states.append(x)
        return [states[i] for i in wanted]
