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

This file is the model. Turning its logits into text (sampling, stop strings, the decode loop behind
`model.generate`, ChatSession) is generate.py; drawing the visual prompts is visual_prompts.py.

Usage: python vipllava.py --image photo.jpg --prompt "What is inside the red box?" --box 40,60,220,300 (see cli.py)
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import generate
import lora
import weights
from clip import CLIPVisionConfig, CLIPVisionTower, activation
from generate import ChatSession  # noqa: F401  (re-exported: `from vipllava import ChatSession`)
from llama import Llama, LlamaConfig
from quantize import (DEFAULT_GROUP_SIZE, Int4Linear, Int8Linear, Linear, check_group_size, check_mode,
                      choose_group_size, portable, quantization_config, quantize_language_model, saved_quantization,
                      weight_bytes)

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
        self.linear_1 = Linear(n_in, c.text_config.hidden_size)
        self.act = activation(c.projector_hidden_act)
        self.linear_2 = Linear(c.text_config.hidden_size, c.text_config.hidden_size)

    def forward(self, x):  # (N, 576, 5*D) -> (N, 576, C)
        return self.linear_2(self.act(self.linear_1(self.projector_layernorm(x))))


IGNORE_INDEX = -100  # a label that is not supervised (the prompt, the image positions, padding)


@dataclass
class VipLlavaOutput:
    """What `VipLlava.forward` returns, so that `model(**inputs).logits` works as in transformers."""
    logits: torch.Tensor | None  # (B, T, vocab), or (B, 1, vocab) with last_only; None with labels
    loss: torch.Tensor | None = None  # with labels: mean cross-entropy over the supervised tokens


class VipLlava(nn.Module):
    def __init__(self, config: VipLlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = Llama(config.text_config)
        self.compiled_step = None  # set by compile_decode
        self.source = self.raw_config = self.quantization = None  # set by from_pretrained, for save_pretrained
        self.generation_config = generate.GenerationConfig()  # from_pretrained reads generation_config.json

    @property
    def dtype(self) -> torch.dtype:  # as transformers' model.dtype (the embedding's: never quantized)
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:  # as transformers' model.device
        return self.language_model.model.embed_tokens.weight.device

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """As transformers' (nn.Embedding weights left out with exclude_embeddings); an int8/int4 layer counts its
        in x out weights, as before quantization."""
        skip = {f"{n}.weight" for n, m in self.named_modules() if exclude_embeddings and isinstance(m, nn.Embedding)}
        n = sum(p.numel() for name, p in self.named_parameters()
                if name not in skip and (p.requires_grad or not only_trainable))
        quantized = (m for m in self.modules() if isinstance(m, (Int8Linear, Int4Linear)))
        return n + (0 if only_trainable else sum(m.in_features * m.out_features for m in quantized))

    def compile_decode(self, mode: str = "reduce-overhead"):
        """Decode through torch.compile'd `Llama.decode_step`: on CUDA one graph replay per token instead of
        hundreds of kernel launches. Each new (batch, cache size) compiles first: ~40 s for the 7B on an H200.
        The KV cache then stays allocated between calls; `model.language_model.remove_cache()` frees it."""
        self.compiled_step = torch.compile(self.language_model.decode_step, mode=mode, fullgraph=True, dynamic=False)
        return self

    def get_image_features(self, pixel_values):  # (N, 3, 336, 336) -> (N, 576, C)
        states = self.vision_tower(pixel_values, self.config.vision_feature_layers)  # 5 x (N, 577, D)
        x = torch.cat([s[:, 1:] for s in states], dim=-1)  # (N, 576, 5*D): CLS dropped, layers side by side
        return self.multi_modal_projector(x)

    def embed(self, input_ids, pixel_values=None, image_features=None):
        """Token embeddings with the image features written into the <image> positions, (B, T, C).
        image_features (N, 576, C), from get_image_features, stand in for pixel_values (a chat reuses them)."""
        x = self.language_model.model.embed_tokens(input_ids)  # (B, T, C)
        is_image = input_ids == self.config.image_token_index  # (B, T)
        images = pixel_values if image_features is None else image_features
        n_tokens, n_images = int(is_image.sum()), 0 if images is None else len(images)
        if n_tokens != n_images * self.config.image_seq_length:
            raise ValueError(
                f"the input has {n_tokens} <image> token(s) but {n_images} image(s) give "
                f"{n_images * self.config.image_seq_length} image features ({self.config.image_seq_length} per image): "
                f"write one <image> per image in the prompt and let VipLlavaProcessor expand it")
        if n_images:
            features = self.get_image_features(pixel_values) if image_features is None else image_features  # (N, 576, C)
            x = x.masked_scatter(is_image[..., None], features.to(x.dtype))
        return x

    def check_inputs(self, input_ids, pixel_values=None, attention_mask=None, generating: bool = False):
        """Check the model's inputs before any computation; returns attention_mask.

        Without attention_mask, rows that start with the pad id are read as left-padded (the processor pads
        on the left) and the mask is inferred: 0 over each row's leading pad ids, 1 from its first other id.
        `generating`: padding on the right is refused (each row continues from the batch's last position).
        """
        c, v = self.config, self.config.vision_config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32) \
                or input_ids.ndim != 2 or input_ids.numel() == 0:
            got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a non-empty integer tensor (B, T), got {got}"
                             + (": add a batch dimension with input_ids[None]" if getattr(input_ids, "ndim", 0) == 1 else ""))
        lo, hi, vocab = int(input_ids.min()), int(input_ids.max()), c.text_config.vocab_size
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids hold ids from {lo} to {hi}, outside the model's vocabulary 0..{vocab - 1}: "
                             f"tokenize with this checkpoint's processor")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise ValueError(f"attention_mask has shape {got} but input_ids {tuple(input_ids.shape)}: they must be "
                                 f"equal, (B, T)")
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (a real token)")
        elif c.pad_token_id is not None and bool((input_ids[:, 0] == c.pad_token_id).any()):
            attention_mask = (input_ids != c.pad_token_id).long().cummax(-1).values  # (B, T): 0 before the first real id
        if generating and attention_mask is not None:
            m = attention_mask.long()
            if bool((m[:, 1:] < m[:, :-1]).any()):
                raise ValueError("attention_mask has padding after a real token: generate continues every row from the "
                                 "last position, so pad on the left (as VipLlavaProcessor does)")
        if pixel_values is not None:
            want = (v.num_channels, v.image_size, v.image_size)
            if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point() \
                    or pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
                got = (f"{pixel_values.dtype} {tuple(pixel_values.shape)}" if isinstance(pixel_values, torch.Tensor)
                       else type(pixel_values).__name__)
                raise ValueError(f"pixel_values must be a float tensor (N, {want[0]}, {want[1]}, {want[2]}) for this "
                                 f"model's vision tower, got {got}: make them with VipLlavaProcessor"
                                 + (" (one image: pixel_values[None])" if getattr(pixel_values, "ndim", 0) == 3 else ""))
        return attention_mask

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, num_items_in_batch=None,
                last_only: bool = False):
        """`.logits` (B, T, vocab) for left-padded input_ids (B, T) holding 576 <image> ids per image.
        Without attention_mask, leading pad ids are masked (see `check_inputs`).

        labels (B, T): `.loss` is the cross-entropy of each supervised label (!= -100) given the tokens before it
        (transformers' shift), summed and divided by `num_items_in_batch` (default: the supervised count, the
        mean). lm_head runs only at the supervised positions, so no (B, T, vocab) logits are made (`.logits` None).
        """
        attention_mask = self.check_inputs(input_ids, pixel_values, attention_mask)
        x = self.embed(input_ids, pixel_values)
        if labels is None:
            return VipLlavaOutput(self.language_model(inputs_embeds=x, attention_mask=attention_mask,
                                                      last_only=last_only))
        hidden = self.language_model(inputs_embeds=x, attention_mask=attention_mask, head=False)  # (B, T, C)
        targets = labels[:, 1:].to(hidden.device)  # (B, T-1): position t predicts token t+1
        keep = targets != IGNORE_INDEX
        logits = self.language_model.lm_head(hidden[:, :-1][keep]).float()  # (N, vocab), N supervised tokens
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        return VipLlavaOutput(None, loss / (keep.sum() if num_items_in_batch is None else num_items_in_batch))

    def generate(self, input_ids, pixel_values=None, attention_mask=None, **kw):
        """New token ids (B, N), the prompt not included (transformers returns both). The decode loop, its
        sampling and stop-string arguments, and continuing a kept KV cache are in generate.py's `generate`."""
        return generate.generate(self, input_ids, pixel_values, attention_mask, **kw)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=None, device=None, quantize: str | None = None,
                        group_size: int | None = None, verbose: bool = True, torch_dtype=None,
                        device_map=None, adapter=None, merge: bool = False) -> "VipLlava":
        """Load a checkpoint folder or hub id.

        dtype None/'auto': bfloat16 with `quantize`; on a CPU float32 if it fits in memory with room to spare,
        else bfloat16; elsewhere the checkpoint's dtype. `torch_dtype` is transformers' older name for it.
        quantize 'int8' / 'int4' (groups of `group_size` inputs; None: 128, or the largest size that divides a
        small model's widths): the language model's Linears are quantized tensor by tensor while loading
        (quantize.py). A folder that save_pretrained wrote from a quantized model loads as it was saved.
        `device_map` as transformers' ("auto", "cpu", "cuda:0", {"": 0}), for one device.
        adapter: a LoRA adapter folder in PEFT's format (finetune.py's output), kept apart in float32 (lora.py),
        or folded into the weights with merge=True. Over an int8/int4 base, keep it apart (QLoRA's way): merging
        re-quantizes each layer with the update in it, which costs accuracy (README).
        """
        if torch_dtype is not None:
            if dtype is not None and dtype != torch_dtype:
                raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree: pass one of them (dtype)")
            dtype = torch_dtype
        if device_map is not None:
            device = weights.device_from_map(device_map, device)
        if quantize is not None:
            check_mode(quantize)
            if group_size is not None:
                check_group_size(group_size)
        device = weights.resolve_device(device)
        weights.resolve_dtype(dtype, device, torch.float16)  # an unknown dtype fails before any download
        folder = weights.resolve(path_or_repo_id)
        raw = weights.read_config(folder)
        if raw.get("model_type", "vipllava") != "vipllava":
            raise ValueError(f"{folder} holds a {raw['model_type']!r} model, not a VipLlava one (model_type vipllava)")
        config = VipLlavaConfig.from_dict(raw)
        saved = saved_quantization(raw, folder, quantize, group_size)  # (mode, group size) of a quantized folder
        mode, group_size = saved or (quantize, group_size)
        if mode == "int4" and not saved:
            t, asked = config.text_config, group_size
            group_size = choose_group_size({t.hidden_size, t.num_attention_heads * t.head_dim, t.intermediate_size},
                                           group_size)
            if asked is None and group_size != DEFAULT_GROUP_SIZE and verbose:
                weights.log(f"int4: group size {group_size}, the largest that divides this model's layer widths "
                            f"(128, the default, does not)")
        group_size = group_size or DEFAULT_GROUP_SIZE  # int8 has no groups: recorded as before

        def build(mode):
            with torch.device("meta"):
                model = cls(config)
                if mode:
                    quantize_language_model(model.language_model, mode, group_size)
            return model

        model = build(mode)
        if dtype in (None, "auto") and (mode or device.type == "cpu"):  # bf16: what the int8/int4 kernels take
            dtype = torch.bfloat16 if mode else weights.auto_cpu_dtype(model, build, verbose)
            if mode and verbose:
                weights.log(f"dtype auto: bfloat16 beside the {mode} weights ({weights.size(weight_bytes(model, torch.bfloat16))})")
        dtype = weights.resolve_dtype(dtype, device, weights.checkpoint_dtype(raw, folder))
        weights.load_weights(model, folder, dtype, device, check=config.check_projector_shape, verbose=verbose,
                             quantizing=bool(mode) and not saved)
        model.source, model.raw_config = folder, raw
        model.generation_config = generate.GenerationConfig.from_dict(
            weights.read_json(folder / "generation_config.json"))
        model.quantization = {"weights": mode, "group_size": group_size} if mode else None
        if adapter is not None:
            lora.load_adapter(model, adapter)
            if merge:
                lora.merge_lora(model)
        return model.eval().requires_grad_(False)

    def save_pretrained(self, folder, max_shard_bytes: int = 5 * 2**30):
        """Write a complete checkpoint folder: safetensors (+ index when sharded), config.json (with a
        `quantization_config` for a quantized model, which from_pretrained then loads as it is) and the
        tokenizer / processor files of the folder the model came from. Quantized layers are written in
        their portable form (quantize.py), whatever device they were packed for."""
        if self.source is None:
            raise ValueError("save_pretrained needs the folder a model came from (its tokenizer and config): "
                             "load the model with VipLlava.from_pretrained")
        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or any(folder.glob("*.safetensors"))):
            raise FileExistsError(f"{folder} is a file or already holds weights: save into a new or empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        with portable(self):
            weights.save_weights(lora.merged_state_dict(self), folder, max_shard_bytes)  # LoRA merged, if any
        config = {k: v for k, v in self.raw_config.items() if k not in ("quantization_config", "torch_dtype")}
        config["dtype"] = str(self.dtype).removeprefix("torch.")
        if self.quantization:
            config["quantization_config"] = quantization_config(**self.quantization)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in sorted(self.source.iterdir()):  # tokenizer, processor, chat template, generation config
            if file.is_file() and file.suffix in (".json", ".jinja", ".model", ".txt") and \
                    file.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copyfile(file, folder / file.name)
        return folder


if __name__ == "__main__":  # the command line lives in cli.py
    from cli import main

    main()
