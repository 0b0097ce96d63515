"""What runs where: the weights' bytes of the real ViP-LLaVA 7B and 13B in float32, bfloat16, int8 and int4.

    python benchmarks/sizes.py [--json]

No weights are read or downloaded: each model is built on the meta device from a config equal to the real
llava-hf/vip-llava-7b-hf / vip-llava-13b-hf one (CLIP ViT-L/14-336 vision tower, 5 x 1024 -> hidden projector,
Llama text model), quantized with quantize.quantize_language_model (int4: groups of 128 inputs; lm_head is
int8 in both modes), and measured with quantize.weight_bytes: float tensors in the column's dtype (bfloat16
for the float parts of int8/int4: the vision tower, projector, embedding, norms), quantized weights and their
scales (and zeros) in their own dtypes. GB are 1e9 bytes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, image_size=336, patch_size=14)
TEXT = {
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}
COLUMNS = ["float32", "bfloat16", "int8", "int4"]
GROUP_SIZE = 128
TARGETS_7B = {"int8": 7.6, "int4": 4.6}  # GB


def config(name: str) -> dict:
    text = TEXT[name] | dict(model_type="llama", num_key_value_heads=TEXT[name]["num_attention_heads"],
                             max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064)
    return {"model_type": "vipllava", "image_token_index": 32000, "pad_token_id": 32001, "image_seq_length": 576,
            "projector_hidden_act": "gelu", "projector_layernorm_eps": 1e-5, "vision_feature_layers": [-2, -5, -8, -11, 6],
            "text_config": text, "vision_config": VISION, "vocab_size": 32064}


def sizes(name: str) -> dict:
    import torch

    import quantize
    from vipllava import VipLlava, VipLlavaConfig

    def build(mode):
        with torch.device("meta"):
            model = VipLlava(VipLlavaConfig.from_dict(config(name)))
            if mode:
                quantize.quantize_language_model(model.language_model, mode, GROUP_SIZE)
        return model

    float_model = build(None)
    decoder = sum(m.weight.numel() for m in float_model.language_model.model.layers.modules()
                  if isinstance(m, torch.nn.Linear))
    out = {"decoder_linear_weights": decoder, "parameters": sum(p.numel() for p in float_model.parameters())}
    out["float32"] = quantize.weight_bytes(float_model, torch.float32) / 1e9
    out["bfloat16"] = quantize.weight_bytes(float_model, torch.bfloat16) / 1e9
    for mode in ("int8", "int4"):
        out[mode] = quantize.weight_bytes(build(mode), torch.bfloat16) / 1e9
    return out


def table(results: dict) -> str:
    lines = ["| weights (GB) | float32 | bfloat16 | int8 | int4 (g128) | decoder Linear weights | parameters |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.2f}" for c in COLUMNS)
                     + f" | {r['decoder_linear_weights'] / 1e9:.2f} B | {r['parameters'] / 1e9:.2f} B |")
    r = results["7B"]
    lines.append("\n7B targets: " + ", ".join(
        f"{mode} {r[mode]:.2f} GB <= {limit} GB: {'met' if r[mode] <= limit else 'NOT met'}" for mode, limit in TARGETS_7B.items()))
    lines.append("float parts of int8/int4 in bfloat16 (vision tower, projector, embedding, norms); lm_head int8 in both; "
                 "weights only: the KV cache and activations come on top")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    results = {name: sizes(name) for name in TEXT}
    print(json.dumps(results) if args.json else table(results))


if __name__ == "__main__":
    main()
