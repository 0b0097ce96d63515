"""Tiny random reference models built with transformers (the oracle), written in each key layout."""
import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

IMAGE_TOKEN, PAD_TOKEN, VOCAB = 120, 121, 128
TEXT = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
# 11 layers: the five default feature layers [-2, -5, -8, -11, 6] are all distinct.
VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=11,
              num_attention_heads=2, image_size=42, patch_size=14)
IMAGE_SEQ = (42 // 14) ** 2  # 9 <image> tokens per image


def reference_model(text=None, vision=None, seed=0, **top):
    """A random transformers VipLlava with our tiny shapes (float32, eval mode)."""
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = VipLlavaConfig(text_config={**TEXT, **(text or {})}, vision_config={**VISION, **(vision or {})},
                            image_token_index=IMAGE_TOKEN, image_seq_length=IMAGE_SEQ, pad_token_id=PAD_TOKEN, **top)
    model = VipLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random LayerNorm/RMSNorm weights too, so a mixed-up norm cannot go unseen
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hub_state_dict(model) -> dict:
    """transformers 5.x in-memory keys -> the hub layout of llava-hf/vip-llava-7b-hf (written here, not by us)."""
    out = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^model\.language_model\.", "language_model.model.", k)
        k = re.sub(r"^model\.vision_tower\.", "vision_tower.vision_model.", k)
        k = re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", k)
        k = re.sub(r"^lm_head\.", "language_model.lm_head.", k)
        out[k] = v.detach().clone().contiguous()
    return out


def to_layout(hub: dict, layout: str) -> dict:
    """Hub keys -> another layout of the facts file (the inverse of each rename)."""
    if layout == "hub":
        return dict(hub)
    out = {}
    for k, v in hub.items():
        if layout == "transformers-4.5x":
            k = re.sub(r"^language_model\.model\.", "model.language_model.", k)
            k = re.sub(r"^language_model\.lm_head\.", "lm_head.", k)
            k = re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", k)
        elif layout == "original":  # LLaVA training checkpoints: Llama keys at the top, CLIP nested
            k = re.sub(r"^language_model\.model\.", "model.", k)
            k = re.sub(r"^language_model\.lm_head\.", "lm_head.", k)
            k = re.sub(r"^vision_tower\.", "model.vision_tower.vision_tower.", k)
            k = k.replace("multi_modal_projector.projector_layernorm", "model.mm_projector.clip_layernorm")
            k = k.replace("multi_modal_projector.linear_1", "model.mm_projector.final_linear.0")
            k = k.replace("multi_modal_projector.linear_2", "model.mm_projector.final_linear.2")
        else:
            raise ValueError(layout)
        out[k] = v
    if layout == "original":  # old transformers stored these buffers; the loader must skip them
        out["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(TEXT["hidden_size"] // 8)
        out["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(IMAGE_SEQ + 1)[None]
    return out


def write_shards(state: dict, folder: Path, n_shards: int = 1, dtype=None):
    """safetensors files as the hub has them: one model.safetensors, or shards plus an index."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v) for k, v in state.items()}
    keys = list(state)
    if n_shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = keys[i::n_shards]
        save_file({k: state[k] for k in part}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def legacy_config(text=None, vision=None, dtype="float16") -> dict:
    """config.json in the exact style of the real vip-llava-7b-hf (transformers 4.36): diff-style
    sub-configs, no vision_feature_layers, a stale vision_feature_layer -2."""
    text = {**TEXT, **(text or {})}
    vision = {**VISION, **(vision or {})}
    return {
        "architectures": ["VipLlavaForConditionalGeneration"], "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN, "model_type": "vipllava", "pad_token_id": PAD_TOKEN,
        "projector_hidden_act": "gelu", "projector_layernorm": False, "projector_layernorm_eps": 1e-05,
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                        **text, "pad_token_id": 0, "torch_dtype": dtype},
        "torch_dtype": dtype, "transformers_version": "4.36.0.dev0",
        "vision_config": {**vision, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": VOCAB,
        "image_seq_length": IMAGE_SEQ,
    }


def write_checkpoint(model, folder: Path, layout="hub", n_shards=1, dtype=None, config=None) -> Path:
    """Write `model` in a key layout. transformers-5.x uses transformers' own save_pretrained."""
    if layout == "transformers-5.x":
        model.save_pretrained(folder, max_shard_size="200KB" if n_shards > 1 else "5GB")
        if dtype is not None:
            raise ValueError("use the hub layout for other dtypes")
        return folder
    write_shards(to_layout(hub_state_dict(model), layout), folder, n_shards, dtype)
    (folder / "config.json").write_text(json.dumps(config or legacy_config(), indent=2))
    return folder


def inputs(batch_rows, seed=0):
    """input_ids (B, T) from rows of (n_pad, n_text_before, n_images, n_text_after), left-padded."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n_pad, before, n_images, after in batch_rows:
        ids = torch.randint(2, IMAGE_TOKEN, (before,), generator=g).tolist()
        for _ in range(n_images):
            ids += [IMAGE_TOKEN] * IMAGE_SEQ + torch.randint(2, IMAGE_TOKEN, (3,), generator=g).tolist()
        ids += torch.randint(2, IMAGE_TOKEN, (after,), generator=g).tolist()
        rows.append(([PAD_TOKEN] * n_pad, ids))
    T = max(len(p) + len(i) for p, i in rows)
    input_ids = torch.full((len(rows), T), PAD_TOKEN)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for r, (_, ids) in enumerate(rows):
        input_ids[r, T - len(ids):] = torch.tensor(ids)
        mask[r, T - len(ids):] = 1
    n_images = sum(r[2] for r in batch_rows)
    pixel_values = torch.randn(n_images, 3, 42, 42, generator=g) if n_images else None
    return input_ids, mask, pixel_values


def reference_logits(model, input_ids, mask, pixel_values):
    """transformers' logits, with left-padded rows positioned from their first real token (as generate does)."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values,
                     position_ids=position_ids).logits


@pytest.fixture(scope="session")
def reference():
    return reference_model()


@pytest.fixture(scope="session")
def hub_checkpoint(reference, tmp_path_factory):
    """The reference in the hub layout, 3 shards, float32, with the real checkpoint's legacy config.json."""
    folder = tmp_path_factory.mktemp("hub")
    return write_checkpoint(reference, folder, "hub", n_shards=3, config=legacy_config(dtype="float32"))


def tracked_changes() -> dict | None:
    """{path: sha1 of its content} for the tracked files that differ from git's index; None outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        names = subprocess.run(["git", "ls-files", "-m"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {n: hashlib.sha1((root / n).read_bytes()).hexdigest() if (root / n).exists() else None
            for n in names.stdout.splitlines()}


@pytest.fixture(scope="session", autouse=True)
def tests_leave_tracked_files_alone():
    """The suite writes only to temporary folders: no tracked file may change while it runs."""
    before = tracked_changes()
    yield
    after = tracked_changes()
    if before is not None and after is not None:
        changed = sorted(n for n in after if after[n] != before.get(n))
        assert not changed, f"the tests changed tracked files: {changed} (write to tmp_path instead)"
