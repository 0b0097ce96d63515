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

Usage: python vipllava.py --image photo.jpg --prompt "What is inside the red box?" --box 40,60,220,300 (see cli.py)
"""
from __future__ import annotations

import json
import math
import numbers
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights
from clip import CLIPVisionConfig, CLIPVisionTower, activation
from llama import Llama, LlamaConfig
from processor import IMAGE_TOKEN, SYSTEM_PROMPT, refuse_image_token
from quantize import (Linear, check_group_size, check_mode, portable, quantization_config, quantize_language_model,
                      saved_quantization, weight_bytes)

DEFAULT_FEATURE_LAYERS = [-2, -5, -8, -11, 6]
CACHE_STEP = 256  # a kept KV cache grows by this many positions, so that a compiled decode step is reused
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


@dataclass
class VipLlavaOutput:
    """What `VipLlava.forward` returns, so that `model(**inputs).logits` works as in transformers."""
    logits: torch.Tensor  # (B, T, vocab), or (B, 1, vocab) with last_only


class VipLlava(nn.Module):
    def __init__(self, config: VipLlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = Llama(config.text_config)
        self.compiled_step = None  # set by compile_decode
        self.source = self.raw_config = self.quantization = None  # set by from_pretrained, for save_pretrained

    @property
    def dtype(self) -> torch.dtype:  # as transformers' model.dtype (the embedding's: never quantized)
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:  # as transformers' model.device
        return self.language_model.model.embed_tokens.weight.device

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

    def forward(self, input_ids, pixel_values=None, attention_mask=None, last_only: bool = False):
        """`.logits` (B, T, vocab) for left-padded input_ids (B, T) holding 576 <image> ids per image.
        Without attention_mask, leading pad ids are masked (see `check_inputs`)."""
        attention_mask = self.check_inputs(input_ids, pixel_values, attention_mask)
        x = self.embed(input_ids, pixel_values)
        return VipLlavaOutput(self.language_model(inputs_embeds=x, attention_mask=attention_mask, last_only=last_only))

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 eos_token_id=None, stop_strings=None, seed=None, streamer=None, tokenizer=None,
                 image_features=None, input_pos: int = 0, keep_cache: bool = False, do_sample=None):
        """New token ids (B, N), the prompt not included (transformers returns both): one prefill, then one
        token per step through the KV cache.

        Greedy when temperature is 0; `do_sample` as in transformers (see `check_sampling`). Without
        attention_mask, rows that start with the pad id are left padding (see `check_inputs`). Rows stop on
        their own (EOS, kept in the output as transformers does, or a stop string, cut from it); finished
        rows are padded. `stop_strings` and `streamer` (a callable fed row 0's text as it becomes final)
        need `tokenizer` (the processor).

        Continuing (what ChatSession does): `keep_cache=True` leaves the KV cache allocated and filled, and
        a later call with `input_pos=P` prefills only its input_ids, at positions P.., after the P positions
        already cached (attention_mask, if given, then covers all P + T). The cache grows in steps of
        CACHE_STEP positions. `image_features` (from get_image_features) replace pixel_values.
        The repetition penalty sees input_ids only, not the cached positions.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        temperature = check_sampling(temperature, top_k, top_p, repetition_penalty, do_sample)
        if input_pos:  # a continued cache: the mask (if any) covers the cached positions too
            self.check_inputs(input_ids, pixel_values)
        else:
            attention_mask = self.check_inputs(input_ids, pixel_values, attention_mask, generating=True)
        if (stop_strings or streamer) and tokenizer is None:
            raise ValueError("stop_strings and streamer need tokenizer= (a VipLlavaProcessor) to read the text")
        B, T = input_ids.shape
        P = input_pos + T  # positions in the cache once the prompt is in
        lm, context = self.language_model, self.config.text_config.max_position_embeddings
        if P + max_new_tokens > context:
            raise ValueError(f"the prompt has {P} tokens; with max_new_tokens={max_new_tokens} that is {P + max_new_tokens}, "
                             f"more than the model's context of {context}: shorten the prompt or lower max_new_tokens")
        if input_pos and lm.cache_length(B) < input_pos:
            raise ValueError(f"input_pos={input_pos} continues a KV cache of at least {input_pos} positions at batch {B}, "
                             f"but the model holds {lm.cache_length(B)}: call generate with keep_cache=True first")
        device = lm.model.embed_tokens.weight.device
        input_ids = input_ids.to(device)
        eos = torch.tensor(eos_token_id if eos_token_id is not None else self.config.text_config.eos_token_id,
                           device=device).flatten()
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else int(eos[0])
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        mask = None  # no padding: no mask tensor, so SDPA may take its flash path
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = torch.ones(B, P + max_new_tokens, dtype=torch.long, device=device)
            mask[:, :P] = attention_mask
        stops = StopStrings(tokenizer, stop_strings or [], B) if tokenizer is not None else None
        static = self.compiled_step is not None
        # A compiled step is specialised to the cache size: round it up so that most prompts (and a chat's
        # turns) share one graph. A continued cache never shrinks: it holds the positions before input_pos.
        max_len = min(-(-(P + max_new_tokens) // CACHE_STEP) * CACHE_STEP, context) if static or keep_cache else P + max_new_tokens
        max_len = max(max_len, lm.cache_length(B)) if input_pos else max_len

        lm.setup_cache(B, max_len)
        try:
            pv = None if pixel_values is None else pixel_values.to(device)
            x = self.embed(input_ids, pv, image_features)  # (B, T, C)
            logits = lm(inputs_embeds=x, attention_mask=None if mask is None else mask[:, :P], input_pos=input_pos,
                        last_only=True)[:, -1]  # (B, vocab)
            if static:  # the cache slots each row may attend to, and each row's count of real tokens
                visible = torch.zeros(B, max_len, dtype=torch.bool, device=device)
                visible[:, :P] = True if mask is None else mask[:, :P].bool()
                n_real = visible.sum(-1, keepdim=True)  # (B, 1): the position of each row's next token
                slots = torch.arange(max_len, device=device)

            def decode(token, step):  # logits (B, vocab) after the token at cache slot P + step
                if static:
                    visible[:, P + step] = True
                    return self.compiled_step(token[:, None], n_real + step, slots[P + step:P + step + 1],
                                              visible[:, None, None]).clone()  # cloned: the graph reuses its output
                return lm(token[:, None], attention_mask=None if mask is None else mask[:, :P + step + 1],
                          input_pos=P + step)[:, -1]

            seen, done, out = input_ids, torch.zeros(B, dtype=torch.bool, device=device), []
            for step in range(max_new_tokens):
                logits = logits.float()
                if repetition_penalty != 1.0:
                    logits = penalize_repetition(logits, seen, repetition_penalty)
                token = torch.where(done, pad, sample(logits, temperature, top_k, top_p, generator))  # (B,)
                out.append(token)
                done |= torch.isin(token, eos)
                if repetition_penalty != 1.0:
                    seen = torch.cat([seen, token[:, None]], dim=1)
                last = step == max_new_tokens - 1
                # On a GPU, queue the next step before reading anything back: it runs while the host checks
                # for stops (reading `token` waits for the sampling only). On a CPU that would be a wasted step.
                queued = not last and queue_ahead(device)
                if queued:
                    logits = decode(token, step)
                if stops is not None:
                    done |= torch.tensor(stops.update(token.tolist(), done.tolist(), streamer), device=device)
                if last or bool(done.all()):
                    break
                if not queued:
                    logits = decode(token, step)
        finally:
            if not (static or keep_cache):  # a compiled step keeps its cache: its CUDA graph replays on those buffers
                lm.remove_cache()
        new = torch.stack(out, dim=1)  # (B, N)
        if stops is not None:
            new = stops.cut(new, pad)
            if streamer:
                streamer(stops.flush())
        return new

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=None, device=None, quantize: str | None = None,
                        group_size: int = 128, verbose: bool = True, torch_dtype=None) -> "VipLlava":
        """Load a checkpoint folder or hub id.

        dtype None/'auto': bfloat16 with `quantize`; on a CPU float32 if it fits in memory with room to spare,
        else bfloat16; elsewhere the checkpoint's dtype. `torch_dtype` is transformers' older name for it.
        quantize 'int8' / 'int4' (groups of `group_size` inputs): the language model's Linears are quantized
        tensor by tensor while loading (quantize.py). A folder that save_pretrained wrote from a quantized
        model loads as it was saved.
        """
        if torch_dtype is not None:
            if dtype is not None and dtype != torch_dtype:
                raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree: pass one of them (dtype)")
            dtype = torch_dtype
        if quantize is not None:
            check_mode(quantize)
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
        model.quantization = {"weights": mode, "group_size": group_size} if mode else None
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
            weights.save_weights(self.state_dict(), folder, max_shard_bytes)
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


def queue_ahead(device: torch.device) -> bool:
    """Whether generate queues the next step before reading the last token back (not on a CPU)."""
    return device.type != "cpu"


# ---------------------------------------------------------------------------- sampling
def check_sampling(temperature: float, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                   do_sample: bool | None = None) -> float:
    """Check the sampling arguments; the temperature to sample at (0: greedy).

    do_sample as in transformers: False is greedy whatever the temperature; True with temperature 0 samples
    at temperature 1 (transformers' default); None leaves the choice to the temperature.
    """
    for name, value in [("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)]:
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}: below 0 the least likely "
                         f"tokens would be the most sampled")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p}")
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1: off, above 1 discourages repeats), got {repetition_penalty}")
    if do_sample is False:
        return 0.0
    return 1.0 if do_sample and temperature == 0 else float(temperature)


def penalize_repetition(logits, seen, penalty: float):
    """transformers' rule: scores of tokens already in the sequence are divided by penalty (x if < 0)."""
    score = logits.gather(1, seen)  # (B, S)
    return logits.scatter(1, seen, torch.where(score < 0, score * penalty, score / penalty))


def sample(logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator=None):
    """(B, vocab) float32 logits -> (B,) token ids. temperature 0: greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:  # keep the k most likely
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p  # the tokens before this one already reach top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class StopStrings:
    """Follows each row's text with the processor's streaming decoder, finds stop strings, and streams
    row 0 without ever printing (part of) a stop string."""

    def __init__(self, tokenizer, stop_strings: list[str], batch: int):
        self.tokenizer, self.stop_strings = tokenizer, list(stop_strings)
        self.decoders = [tokenizer.stream_decoder() for _ in range(batch)]
        self.ids, self.text = [[] for _ in range(batch)], [""] * batch
        self.cut_at = [None] * batch  # number of tokens kept where a stop string was found
        self.closed = [False] * batch  # rows that need no more decoding
        self.sent = 0  # how much of row 0 was streamed

    def update(self, tokens: list[int], done: list[bool], streamer=None) -> list[bool]:
        """Add one token per row (done: rows finished before or by this token); which rows hit a stop string."""
        hit = [False] * len(tokens)
        for b, token in enumerate(tokens):
            if self.closed[b] or not (self.stop_strings or b == 0 and streamer):
                continue
            self.closed[b] = done[b]
            self.ids[b].append(token)
            self.text[b] += self.decoders[b].push(token) + (self.decoders[b].flush() if done[b] else "")
            found = [self.text[b].find(s) for s in self.stop_strings if s in self.text[b]]
            if found:
                hit[b] = self.closed[b] = True
                self.text[b] = self.text[b][:min(found)]
                keep = len(self.ids[b])  # the longest prefix of tokens whose text ends before the stop string
                while keep and len(self.tokenizer.decode(self.ids[b][:keep], skip_special_tokens=True)) > len(self.text[b]):
                    keep -= 1
                self.cut_at[b] = keep
            if b == 0 and streamer:
                final = len(self.text[0]) - (0 if self.closed[0] else self.partial_stop(self.text[0]))
                if final > self.sent:
                    streamer(self.text[0][self.sent:final])
                    self.sent = final
        return hit

    def partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that could be the start of a stop string: held back."""
        return max((k for s in self.stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def flush(self) -> str:
        """Row 0's text not streamed yet (what the decoder held back included)."""
        self.text[0] += "" if self.closed[0] else self.decoders[0].flush()
        rest, self.sent = self.text[0][self.sent:], len(self.text[0])
        return rest

    def cut(self, new, pad: int):
        for b, keep in enumerate(self.cut_at):
            if keep is not None:
                new[b, keep:] = pad
        return new


# ---------------------------------------------------------------------------- conversations
class ChatSession:
    """A conversation about one image that keeps its KV cache from turn to turn.

    Each `ask` renders the whole conversation as a fresh prompt (apply_chat_template, then the processor's
    tokens), compares it with the token ids whose keys and values are cached, and prefills from the first
    difference only: the new question and the template's separators, plus the last tokens of the previous
    answer where its text tokenizes differently from how it was generated (the `###` stop string, a space).
    So a greedy answer is token for token what `generate` gives over the full prompt. The image is encoded
    once. When a turn would not fit the context, the oldest question/answer pairs after the first are dropped.

    After `ask`: `conversation` (the messages, system included), `last_prefill_tokens`, `last_new_tokens`,
    `last_token_ids` (generate's output), `last_time_to_first_token` (s until the first text of the answer),
    `last_seconds`, `last_dropped` (pairs dropped for the context). The session keeps its own cache, so
    several sessions may share a model (switching between them costs a full prefill); `close()` frees it.
    """

    def __init__(self, model: VipLlava, processor, image=None, system: str | None = None, template: str = "vipllava",
                 image_mode: str = "pad"):
        self.model, self.processor, self.image, self.template = model, processor, image, template
        processor.apply_chat_template([{"role": "user", "content": "?"}], template=template)  # an unknown one fails now
        system = SYSTEM_PROMPT if system is None else system  # "" : no system line
        self.system = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        self.conversation = list(self.system)
        self.pixel_values = None if image is None else processor(IMAGE_TOKEN, images=[image], image_mode=image_mode)["pixel_values"]
        self.image_features = None  # (1, 576, C), computed on the first turn that needs them
        self.ids, self.cache = [], None  # token ids whose keys/values `cache` (one KVCache per layer) holds
        self.last_prefill_tokens = self.last_new_tokens = self.last_dropped = 0
        self.last_token_ids, self.last_time_to_first_token, self.last_seconds = [], 0.0, 0.0

    def ask(self, question: str, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, seed=None, streamer=None) -> str:
        """The answer to `question` (stripped), streamed piece by piece to `streamer` if given."""
        refuse_image_token(question, "the question", "the session's image is given once, to ChatSession(image=...)")
        first = not any(m["role"] == "user" for m in self.conversation)
        content = [{"type": "image"}] * (first and self.image is not None) + [{"type": "text", "text": question}]
        conversation, prompt, dropped = self.fit(self.conversation + [{"role": "user", "content": content}], max_new_tokens)
        t0, first_piece = time.perf_counter(), []

        def stream(piece):
            if piece and not first_piece:
                first_piece.append(time.perf_counter())
            if streamer:
                streamer(piece)

        stops = ["###"] if self.template == "vipllava" else None
        new = self.continue_with(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, stop_strings=stops, streamer=stream)
        out = new[0].tolist()
        self.remember(prompt, out[:-1])  # the last token was sampled, not fed (on a GPU it may be: never mind)
        answer = self.processor.decode(out, skip_special_tokens=True).strip()
        self.conversation = conversation + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.last_seconds = time.perf_counter() - t0
        self.last_time_to_first_token = (first_piece[0] if first_piece else time.perf_counter()) - t0
        self.last_new_tokens, self.last_token_ids, self.last_dropped = len(out), out, dropped
        return answer

    def prefill(self) -> int:
        """Prefill the conversation as it stands (the image and system line, before a first question), so that
        the next `ask` starts sooner; also after editing `conversation`. Returns the tokens prefilled."""
        conversation = self.conversation
        if self.image is not None and not any(m["role"] == "user" for m in conversation):
            conversation = conversation + [{"role": "user", "content": [{"type": "image"}]}]
        if not conversation:
            return 0
        prompt = self.processor.encode(self.processor.apply_chat_template(conversation, template=self.template))
        self.continue_with(prompt, max_new_tokens=1)
        self.remember(prompt, [])
        return self.last_prefill_tokens

    def reset(self):
        """Forget the turns; keep the image, its features and the cache (the next prompt starts as the
        cached one did, with the system line and the image, and that part is not prefilled again)."""
        self.conversation = list(self.system)

    def close(self):
        """Free the KV cache (the session stays usable: its next turn prefills everything again)."""
        self.ids, self.cache = [], None

    def fit(self, conversation: list, max_new_tokens: int):
        """(conversation, its prompt ids, pairs dropped): the oldest question/answer pairs after the first are
        dropped until the prompt and max_new_tokens fit the context. The input list is left as it is."""
        context, dropped = self.model.config.text_config.max_position_embeddings, 0
        first_pair = len(self.system)  # the first user message: the image turn, kept
        while True:
            rendered = self.processor.apply_chat_template(conversation, add_generation_prompt=True, template=self.template)
            prompt = self.processor.encode(rendered)
            if len(prompt) + max_new_tokens <= context:
                break
            if len(conversation) - first_pair < 5:  # first question, its answer, the new question: nothing to drop
                kept = "" if len(conversation) - first_pair == 1 else " with only the first question and answer kept"
                raise ValueError(f"this turn's prompt takes {len(prompt)} tokens{kept}; with max_new_tokens={max_new_tokens} "
                                 f"that is {len(prompt) + max_new_tokens}, more than the model's context of {context}: "
                                 f"ask a shorter question, lower max_new_tokens, or start a new ChatSession")
            conversation = conversation[:first_pair + 2] + conversation[first_pair + 4:]
            dropped += 1
        if dropped:
            weights.log(f"[the conversation outgrew the context of {context} tokens: dropped the {dropped} oldest "
                        f"question/answer pair(s) after the first]")
        return conversation, prompt, dropped

    def continue_with(self, prompt: list[int], **generate_kw):
        """generate over `prompt`, prefilling only what follows the longest cached prefix."""
        start = 0
        for cached, new in zip(self.ids, prompt):
            if cached != new:
                break
            start += 1
        start = min(start, len(prompt) - 1)  # at least one token to prefill: its logits give the first new token
        image_id, features = self.processor.image_token_id, None
        if image_id in prompt[start:]:  # the image is prefilled whole, never from the middle of its positions
            start = min(start, prompt.index(image_id))
            if self.image_features is None:
                with torch.inference_mode():
                    device = self.model.device
                    self.image_features = self.model.get_image_features(self.pixel_values.to(device))
            features = self.image_features
        self.ids = self.ids[:start]  # generate overwrites the cache from `start` on
        layers = self.model.language_model.model.layers
        for layer, cache in zip(layers, self.cache or [None] * len(layers)):  # this session's cache into the model
            layer.self_attn.kv_cache = cache
        try:
            new = self.model.generate(torch.tensor([prompt[start:]]), image_features=features, input_pos=start,
                                      keep_cache=True, tokenizer=self.processor, **generate_kw)
        finally:  # and out again, so that nothing else writes into it
            self.cache = [layer.self_attn.kv_cache for layer in layers]
            self.model.language_model.remove_cache()
        self.last_prefill_tokens = len(prompt) - start
        return new

    def remember(self, prompt: list[int], fed: list[int]):
        """The ids now cached: the prompt and the generated tokens fed back. Tokens a stop string cut were
        replaced by padding in generate's output: trailing pad ids are left out (at worst re-prefilled)."""
        eos = torch.tensor(self.model.config.text_config.eos_token_id).flatten()
        pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else int(eos[0])  # as generate
        while fed and fed[-1] == pad:
            fed = fed[:-1]
        self.ids = prompt + fed


if __name__ == "__main__":  # the command line lives in cli.py
    from cli import main

    main()
