"""ViP-LLaVA: LLaVA-1.5 that understands visual prompts (boxes, arrows, scribbles drawn on the photo).

    image (3, 336, 336) -> CLIP ViT-L/14 -> hidden states [-2, -5, -8, -11, 6], CLS dropped
      -> concat (576, 5*1024) -> LayerNorm -> Linear -> GELU -> Linear -> (576, 4096)
    text "...<image>\\n..." -> each <image> expanded to 576 positions (the processor does that)
      -> token embeddings, the 576 positions replaced by the image features -> Vicuna -> logits

Quirks worth knowing:
- five CLIP layers, shallow to deep, are concatenated (plain LLaVA-1.5 takes only layer -2), and a
  LayerNorm comes before the projector MLP;
- the real config.json has no `vision_feature_layers` key and a stale `vision_feature_layer: -2`;
  see `feature_layers` for the rule that loads it as the 5-layer model it is;
- the model was trained on images padded to a square (`image_mode="pad"` in the processor).

Usage: python vipllava.py --image photo.jpg --prompt "What is inside the red box?" --box 40,60,220,300
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights
from clip import CLIPVisionConfig, CLIPVisionTower, activation
from llama import Llama, LlamaConfig

DEFAULT_FEATURE_LAYERS = [-2, -5, -8, -11, 6]
# transformers' VipLlavaConfig builds CLIP ViT-L/14-336 when config.json has no vision_config at all.
DEFAULT_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14)


def feature_layers(d: dict) -> list[int]:
    """The CLIP layers the projector reads, from config.json.

    `vision_feature_layers` wins. transformers >= 5 renamed it to the singular `vision_feature_layer`,
    so that key counts only in configs written by transformers >= 5: in older configs (the real
    vip-llava-7b-hf) it is a stale LLaVA-1.5 leftover (-2) and the default five layers apply.
    """
    if "vision_feature_layers" in d:
        layers = d["vision_feature_layers"]
    elif "vision_feature_layer" in d and int(str(d.get("transformers_version", "0")).split(".")[0]) >= 5:
        layers = d["vision_feature_layer"]
    else:
        layers = DEFAULT_FEATURE_LAYERS
    return [layers] if isinstance(layers, int) else list(layers)


@dataclass
class VipLlavaConfig:
    vision_config: CLIPVisionConfig = field(default_factory=lambda: CLIPVisionConfig(**DEFAULT_VISION))
    text_config: LlamaConfig = field(default_factory=LlamaConfig)
    vision_feature_layers: list[int] = field(default_factory=lambda: list(DEFAULT_FEATURE_LAYERS))
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    projector_layernorm_eps: float = 1e-5
    image_seq_length: int = 576
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "VipLlavaConfig":
        vision = d.get("vision_config")
        return cls(
            vision_config=CLIPVisionConfig.from_dict(DEFAULT_VISION if vision is None else vision),
            text_config=LlamaConfig.from_dict(d.get("text_config") or {}),
            vision_feature_layers=feature_layers(d),
            image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_layernorm_eps=d.get("projector_layernorm_eps", 1e-5),
            image_seq_length=d.get("image_seq_length", 576),
            pad_token_id=d.get("pad_token_id"),
        )

    def check_projector_shape(self, name: str, checkpoint_shape: tuple, model_shape: tuple):
        """A clearer error than 'shape mismatch' when the feature layers do not fit the projector."""
        if name not in ("multi_modal_projector.projector_layernorm.weight", "multi_modal_projector.linear_1.weight"):
            return
        width, D, layers = checkpoint_shape[-1], self.vision_config.hidden_size, self.vision_feature_layers
        raise ValueError(
            f"config.json selects {len(layers)} vision feature layer(s) {layers}, a projector input of "
            f"{len(layers)} x {D} = {len(layers) * D}, but the checkpoint's projector takes {width}"
            + (f" = {width // D} x {D}" if width % D == 0 else "")
            + f" ({name} {checkpoint_shape}). Set \"vision_feature_layers\" in config.json to the layers the weights "
            f"were trained with (ViP-LLaVA: {DEFAULT_FEATURE_LAYERS}).")


class MultiModalProjector(nn.Module):
    def __init__(self, c: VipLlavaConfig):
        super().__init__()
        n_in = len(c.vision_feature_layers) * c.vision_config.hidden_size
        self.projector_layernorm = nn.LayerNorm(n_in, eps=c.projector_layernorm_eps)
        self.linear_1 = nn.Linear(n_in, c.text_config.hidden_size)
        self.act = activation(c.projector_hidden_act)
        self.linear_2 = nn.Linear(c.text_config.hidden_size, c.text_config.hidden_size)

    def forward(self, x):  # (N, 576, 5*D) -> (N, 576, C)
        return self.linear_2(self.act(self.linear_1(self.projector_layernorm(x))))


class VipLlava(nn.Module):
    def __init__(self, config: VipLlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = Llama(config.text_config)

    def get_image_features(self, pixel_values):  # (N, 3, 336, 336) -> (N, 576, C)
        states = self.vision_tower(pixel_values, self.config.vision_feature_layers)  # 5 x (N, 577, D)
        x = torch.cat([s[:, 1:] for s in states], dim=-1)  # (N, 576, 5*D): CLS dropped, layers side by side
        return self.multi_modal_projector(x)

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with the image features written into the <image> positions, (B, T, C)."""
        x = self.language_model.model.embed_tokens(input_ids)  # (B, T, C)
        is_image = input_ids == self.config.image_token_index  # (B, T)
        n_tokens, n_images = int(is_image.sum()), 0 if pixel_values is None else len(pixel_values)
        if n_tokens != n_images * self.config.image_seq_length:
            raise ValueError(
                f"the input has {n_tokens} <image> token(s) but {n_images} image(s) give "
                f"{n_images * self.config.image_seq_length} image features ({self.config.image_seq_length} per image): "
                f"write one <image> per image in the prompt and let VipLlavaProcessor expand it")
        if n_images:
            features = self.get_image_features(pixel_values)  # (N, 576, C), images in batch order
            x = x.masked_scatter(is_image[..., None], features.to(x.dtype))
        return x

    def forward(self, input_ids, pixel_values=None, attention_mask=None, last_only: bool = False):
        """Logits (B, T, vocab) for left-padded input_ids (B, T) holding 576 <image> ids per image."""
        x = self.embed(input_ids, pixel_values)
        return self.language_model(inputs_embeds=x, attention_mask=attention_mask, last_only=last_only)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=None, device=None, verbose: bool = True) -> "VipLlava":
        """Load a checkpoint folder or hub id. dtype None: float32 on CPU, the checkpoint's dtype elsewhere."""
        device = weights.resolve_device(device)
        weights.resolve_dtype(dtype, device, torch.float16)  # an unknown dtype fails before any download
        folder = weights.resolve(path_or_repo_id)
        raw = weights.read_config(folder)
        if raw.get("model_type", "vipllava") != "vipllava":
            raise ValueError(f"{folder} holds a {raw['model_type']!r} model, not a VipLlava one (model_type vipllava)")
        config = VipLlavaConfig.from_dict(raw)
        dtype = weights.resolve_dtype(dtype, device, weights.checkpoint_dtype(raw, folder))
        with torch.device("meta"):
            model = cls(config)
        weights.load_weights(model, folder, dtype, device, check=config.check_projector_shape, verbose=verbose)
        return model.eval().requires_grad_(False)
