"""LoRA as PEFT defines it, wrapped around a loaded VipLlava from outside (the model files know nothing of it).

    y = base(x) + lora_B(lora_A(dropout(x))) * alpha / r        (alpha / sqrt(r) with rsLoRA)
    lora_A (r, in) Kaiming-uniform(a=sqrt(5)), lora_B (out, r) zeros: a new adapter changes nothing

Quirks worth knowing:
- the LoRA weights may be float32 over a bf16 base: the input is cast to lora_A's dtype and the sum back to
  the base output's dtype, in PEFT's order, so the numbers equal PEFT's;
- files are PEFT's: `adapter_config.json` and `adapter_model.safetensors` with the module paths of transformers'
  `VipLlavaForConditionalGeneration` (`base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight`,
  no adapter name), and modules trained in full (`modules_to_save`, the projector) under their own path;
- PEFT matches a list of `target_modules` by name suffix, so ["q_proj", ...] would wrap CLIP's q/k/v too:
  we write a regex over the language model's projections (what ViP-LLaVA's LoRA scripts target);
- QLoRA: the base may be quantize.py's Int8Linear/Int4Linear (frozen; their backward passes the input's gradient
  through the dequantized weight a piece at a time). Merging into such a base re-quantizes W + BA: lossy (README).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from quantize import QUANTIZED, Int4Linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_REGEX = r".*language_model.*\.(" + "|".join(TARGETS) + ")"
# our module path -> transformers' (5.x), the names PEFT's files use
TO_TRANSFORMERS = [(r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head", "lm_head"),
                   (r"^vision_tower\.vision_model\.", "model.vision_tower."),
                   (r"^multi_modal_projector\.", "model.multi_modal_projector.")]
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


def transformers_name(name: str) -> str:
    for pattern, repl in TO_TRANSFORMERS:
        name = re.sub(pattern, repl, name)
    return name


@dataclass
class LoraConfig:
    r: int = 128  # ViP-LLaVA's LoRA scripts: r 128, alpha 256, dropout 0.05
    lora_alpha: float = 256
    lora_dropout: float = 0.05
    use_rslora: bool = False
    target_modules: str | list = TARGET_REGEX
    modules_to_save: list = field(default_factory=lambda: ["multi_modal_projector"])

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def targets(self, name: str) -> bool:
        """Whether PEFT wraps the module at transformers' path `name`: a string is a full regex match, a list
        matches by name suffix (as PEFT's `check_target_module_exists`)."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)

    def to_peft(self, base_model_name_or_path: str = "") -> dict:
        """adapter_config.json, with the fields PEFT's LoraConfig reads."""
        return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
                "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "use_rslora": self.use_rslora, "target_modules": self.target_modules,
                "modules_to_save": self.modules_to_save, "bias": "none", "fan_in_fan_out": False,
                "init_lora_weights": True, "inference_mode": True, "use_dora": False}

    @classmethod
    def from_peft(cls, d: dict, file="adapter_config.json") -> "LoraConfig":
        if d.get("peft_type") != "LORA":
            raise ValueError(f"{file} has peft_type {d.get('peft_type')!r}: only LoRA adapters ('LORA') load here")
        unsupported = {k: d[k] for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                                         "layers_to_transform", "layer_replication") if d.get(k)}
        if d.get("bias", "none") != "none":
            unsupported["bias"] = d["bias"]
        if unsupported:
            raise ValueError(f"{file} uses LoRA options not supported here: {unsupported}")
        return cls(d["r"], d["lora_alpha"], d.get("lora_dropout", 0.0), d.get("use_rslora", False),
                   d["target_modules"], list(d.get("modules_to_save") or []))


class LoRALinear(nn.Module):
    """A Linear (plain or quantized) with a trainable low-rank update; the base keeps its weights and its name."""

    def __init__(self, base_layer: nn.Module, config: LoraConfig, dtype=torch.float32):
        super().__init__()
        w = base_layer.weight
        n_out, n_in = base_layer.out_features, base_layer.in_features
        self.base_layer, self.scaling = base_layer, config.scaling
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.lora_A = nn.Linear(n_in, config.r, bias=False, device=w.device, dtype=dtype)  # (r, in)
        self.lora_B = nn.Linear(config.r, n_out, bias=False, device=w.device, dtype=dtype)  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init: B = 0, so no change at first
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):  # (..., in) -> (..., out)
        y = self.base_layer(x)
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))  # in LoRA's dtype
        return (y + lora * self.scaling).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + B @ A * scaling, computed in float32, in W's dtype (float32 over an int8/int4 base)."""
        quantized = isinstance(self.base_layer, QUANTIZED)
        w = self.base_layer.dequantize() if quantized else self.base_layer.weight
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)
        return (w.float() + delta).to(torch.float32 if quantized else w.dtype).detach()


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, config: LoraConfig, dtype=torch.float32, seed: int | None = None) -> list[str]:
    """Wrap every Linear that `config` targets (names as transformers has them) in a LoRALinear, in place.
    Returns our names of the wrapped modules. `seed`: the lora_A draws (else torch's current random state)."""
    if seed is not None:
        torch.manual_seed(seed)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, *QUANTIZED)) and not isinstance(module, LoRALinear) and \
                config.targets(transformers_name(name)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoRALinear(module, config, dtype))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"target_modules {config.target_modules!r} matches no Linear layer of the model")
    return wrapped


def requantize(layer: nn.Module, w: torch.Tensor):
    """Quantize the float (out, in) `w` into the int8/int4 `layer`, in place: its scales are fitted anew."""
    if isinstance(layer, Int4Linear):
        layer.unpack()  # the portable layout, where from_float's tensors fit
    for key, value in layer.from_float(w).items():
        getattr(layer, key).copy_(value)
    layer.pack()


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and drop the wrappers (the model then is a plain VipLlava).
    An int8/int4 base is re-quantized with the update in it: that costs accuracy (README: serve it unmerged)."""
    for name, m in lora_modules(model).items():
        with torch.no_grad():
            if isinstance(m.base_layer, QUANTIZED):
                requantize(m.base_layer, m.merged_weight())
            else:
                m.base_layer.weight.copy_(m.merged_weight())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.base_layer)
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` as if every LoRA were merged: the plain model's keys, the model left as it is."""
    state = model.state_dict()
    for name, m in lora_modules(model).items():
        if isinstance(m.base_layer, QUANTIZED):
            raise ValueError(f"{name}: an unmerged LoRA over an int8/int4 layer has no plain weight to save: save the "
                             "adapter (lora.save_adapter), or lora.merge_lora(model) first (re-quantizes: lossy)")
        for key in [k for k in state if k.startswith(name + ".")]:
            value = state.pop(key)
            if key.startswith(name + ".base_layer."):
                state[name + "." + key.removeprefix(name + ".base_layer.")] = value
        state[name + ".weight"] = m.merged_weight()
    return state


def adapter_state_dict(model: nn.Module, config: LoraConfig) -> dict[str, torch.Tensor]:
    """PEFT's adapter_model.safetensors keys: lora_A/lora_B per wrapped module, full weights of modules_to_save."""
    out = {}
    for name, m in lora_modules(model).items():
        key = PREFIX + transformers_name(name)
        out[key + ".lora_A.weight"] = m.lora_A.weight
        out[key + ".lora_B.weight"] = m.lora_B.weight
    for module_name in config.modules_to_save:
        for name, p in model.get_submodule(module_name).state_dict().items():
            out[PREFIX + transformers_name(f"{module_name}.{name}")] = p
    out = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in out.items()}  # FSDP: gather shards
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_adapter(model: nn.Module, config: LoraConfig, folder, base_model_name_or_path: str = "",
                 state: dict | None = None) -> Path:
    """`state`: adapter_state_dict(model, config) if already made (under FSDP every rank makes it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model, config) if state is None else state
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config.to_peft(base_model_name_or_path), indent=2) + "\n")
    return folder


def load_adapter(model: nn.Module, folder, dtype=torch.float32) -> LoraConfig:
    """Wrap `model` as the adapter in `folder` says and load its weights; every key must be used, none missing."""
    folder = Path(folder)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{folder} is not a LoRA adapter folder: it needs adapter_config.json and "
                                f"adapter_model.safetensors (what finetune.py or PEFT's save_pretrained writes)")
    config = LoraConfig.from_peft(json.loads(config_file.read_text()), config_file)
    add_lora(model, config, dtype)
    load_adapter_weights(model, config, weights_file)
    return config


def load_adapter_weights(model: nn.Module, config: LoraConfig, weights_file):
    """Copy an adapter_model.safetensors into a model that `config`'s LoRA already wraps (resuming a run)."""
    state = load_file(weights_file)
    ours = adapter_state_dict(model, config)  # the keys and shapes the file must have
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not fit this model: missing {missing[:3]} ({len(missing)}), "
                         f"unexpected {unexpected[:3]} ({len(unexpected)}); was it trained for another base model?")
    for k, v in ours.items():
        if v.shape != state[k].shape:
            raise ValueError(f"{weights_file}: {k} has shape {tuple(state[k].shape)}, the model needs {tuple(v.shape)}")
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            key = PREFIX + transformers_name(name)
            m.lora_A.weight.copy_(state[key + ".lora_A.weight"])
            m.lora_B.weight.copy_(state[key + ".lora_B.weight"])
        for module_name in config.modules_to_save:
            for name, p in model.get_submodule(module_name).named_parameters():
                p.copy_(state[PREFIX + transformers_name(f"{module_name}.{name}")])
