"""The model and the loader against transformers (the reference) on tiny random checkpoints."""
import json

import pytest
import torch

import weights
from conftest import (IMAGE_SEQ, IMAGE_TOKEN, PAD_TOKEN, inputs, legacy_config, reference_logits, reference_model,
                      write_checkpoint)
from vipllava import DEFAULT_FEATURE_LAYERS, VipLlava

FP32_TOL = 1e-4  # max |difference| of logits in float32
# fp16/bf16: rounding along the way differs a little; measured max 4.9e-4 (fp16) and 3.9e-3 (bf16),
# one unit in the last place at the logits' scale (~0.76). Bounds: 4 units in the last place.
HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Two rows: one left-padded, each with an image, text before and after it.
BATCH = [(0, 5, 1, 6), (4, 2, 1, 5)]


def max_diff(ours, ref, mask):
    return (ours.float() - ref.float())[mask.bool()].abs().max().item()


@pytest.mark.parametrize("layout,n_shards", [("hub", 3), ("transformers-5.x", 3), ("transformers-4.5x", 1),
                                             ("original", 2)])
def test_logits_match_reference_in_every_key_layout(reference, tmp_path, layout, n_shards):
    config = None if layout == "transformers-5.x" else legacy_config(dtype="float32")
    folder = write_checkpoint(reference, tmp_path, layout, n_shards=n_shards, config=config)
    if n_shards > 1:
        assert len(list(tmp_path.glob("*.safetensors"))) >= 2 and (tmp_path / "model.safetensors.index.json").exists()
    model = VipLlava.from_pretrained(tmp_path)
    assert model.config.vision_feature_layers == DEFAULT_FEATURE_LAYERS
    ids, mask, px = inputs(BATCH)
    assert max_diff(model(ids, px, mask).logits, reference_logits(reference, ids, mask, px), mask) <= FP32_TOL


def test_legacy_config_loads_as_the_five_layer_model(hub_checkpoint):
    """The real config.json has a stale `vision_feature_layer: -2` and no `vision_feature_layers`."""
    config = json.loads((hub_checkpoint / "config.json").read_text())
    assert config["vision_feature_layer"] == -2 and "vision_feature_layers" not in config
    model = VipLlava.from_pretrained(hub_checkpoint)
    assert model.config.vision_feature_layers == [-2, -5, -8, -11, 6]
    assert model.multi_modal_projector.projector_layernorm.weight.shape == (5 * 32,)


def test_transformers_misreads_the_legacy_config(hub_checkpoint):
    """Why the rule exists: the reference reads -2 and builds a 1-layer projector (LayerNorm of 32)."""
    from transformers import VipLlavaConfig

    assert VipLlavaConfig.from_pretrained(hub_checkpoint).vision_feature_layer == -2


def test_batch_with_padding_two_images_and_no_image(reference, hub_checkpoint):
    model = VipLlava.from_pretrained(hub_checkpoint)
    ids, mask, px = inputs([(0, 3, 2, 4), (7, 2, 1, 3), (20, 6, 0, 7)])  # 2 images in one row, a text-only row
    assert px.shape[0] == 3
    assert max_diff(model(ids, px, mask).logits, reference_logits(reference, ids, mask, px), mask) <= FP32_TOL


def test_text_only_batch_matches_reference(reference, hub_checkpoint):
    model = VipLlava.from_pretrained(hub_checkpoint)
    ids, mask, _ = inputs([(0, 12, 0, 0), (5, 7, 0, 0)])
    assert max_diff(model(ids, None, mask).logits, reference_logits(reference, ids, mask, None), mask) <= FP32_TOL


def test_left_padded_row_equals_the_same_row_alone(hub_checkpoint):
    model = VipLlava.from_pretrained(hub_checkpoint)
    ids, mask, px = inputs(BATCH)
    batched = model(ids, px, mask).logits
    alone = model(ids[1:, 4:], px[1:]).logits  # row 1 without its 4 pad tokens
    assert (batched[1, 4:] - alone[0]).abs().max().item() <= FP32_TOL


def test_image_features_match_reference(reference, hub_checkpoint):
    model = VipLlava.from_pretrained(hub_checkpoint)
    px = torch.randn(2, 3, 42, 42)
    ours = model.get_image_features(px)
    with torch.no_grad():
        ref = reference.model.get_image_features(pixel_values=px)
    ref = getattr(ref, "pooler_output", ref)
    assert ours.shape == (2, IMAGE_SEQ, 64)
    assert (ours - ref).abs().max().item() <= FP32_TOL


def test_vision_tower_stops_at_the_deepest_layer_needed(hub_checkpoint):
    model = VipLlava.from_pretrained(hub_checkpoint)
    ran = []
    for i, layer in enumerate(model.vision_tower.vision_model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: ran.append(i))
    model.get_image_features(torch.randn(1, 3, 42, 42))
    assert ran == list(range(10))  # layer 11 (index 10) is never computed for [-2, ...] of 12 states


def test_int_feature_layer_config_written_by_transformers_5(tmp_path):
    reference = reference_model(vision_feature_layer=-2)
    write_checkpoint(reference, tmp_path, "transformers-5.x")
    model = VipLlava.from_pretrained(tmp_path)
    assert model.config.vision_feature_layers == [-2]
    ids, mask, px = inputs(BATCH)
    assert max_diff(model(ids, px, mask).logits, reference_logits(reference, ids, mask, px), mask) <= FP32_TOL


def test_without_gqa_and_with_another_layer_list(tmp_path):
    reference = reference_model(text=dict(num_key_value_heads=4), vision_feature_layer=[-1, 3, 0])
    write_checkpoint(reference, tmp_path, "transformers-5.x")
    model = VipLlava.from_pretrained(tmp_path)
    ids, mask, px = inputs(BATCH)
    assert max_diff(model(ids, px, mask).logits, reference_logits(reference, ids, mask, px), mask) <= FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_within_bound(reference, tmp_path, dtype):
    write_checkpoint(reference, tmp_path, "hub", dtype=dtype, config=legacy_config(dtype=str(dtype)[6:]))
    model = VipLlava.from_pretrained(tmp_path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    ref = reference_model().to(dtype)
    ids, mask, px = inputs(BATCH)
    ours = model(ids, px.to(dtype), mask).logits
    assert ours.dtype == dtype
    assert max_diff(ours, reference_logits(ref, ids, mask, px.to(dtype)), mask) <= HALF_TOL[dtype]


def test_default_dtype_is_float32_on_cpu_even_for_an_fp16_checkpoint(reference, tmp_path):
    write_checkpoint(reference, tmp_path, "hub", dtype=torch.float16, config=legacy_config())
    model = VipLlava.from_pretrained(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(p.is_meta for p in model.parameters())


def test_image_token_count_mismatch_names_both_counts(hub_checkpoint):
    model = VipLlava.from_pretrained(hub_checkpoint)
    ids, mask, px = inputs([(0, 3, 1, 3)])
    with pytest.raises(ValueError, match=rf"{IMAGE_SEQ - 1} <image> token.*1 image\(s\) give {IMAGE_SEQ}"):
        model(ids[:, 1:][:, [i for i in range(ids.shape[1] - 1) if i != 4]], px)
    with pytest.raises(ValueError, match=rf"{IMAGE_SEQ} <image> token.*2 image\(s\) give {2 * IMAGE_SEQ}"):
        model(ids, torch.cat([px, px]))
    with pytest.raises(ValueError, match=rf"{IMAGE_SEQ} <image> token.*0 image\(s\)"):
        model(ids, None)


def test_prompt_longer_than_the_context_is_an_error(hub_checkpoint):
    model = VipLlava.from_pretrained(hub_checkpoint)
    with pytest.raises(ValueError, match="257 tokens exceed the model's context of 256"):
        model(torch.full((1, 257), 5))



def test_cpu_fast_paths_equal_plain_linear_with_and_without_autograd():
    # quantize.Linear's CPU paths (one row split between threads, 2-16 rows transposed, many rows) must give
    # F.linear's numbers, under inference_mode and with autograd on (weights that require grad).
    import quantize

    torch.manual_seed(0)
    lin = quantize.Linear(64, 96)
    for rows in (1, 3, 40):
        x = torch.randn(1, rows, 64)
        expected = torch.nn.functional.linear(x, lin.weight, lin.bias)
        with torch.inference_mode():
            assert torch.allclose(lin(x), expected, atol=1e-6)
        y = lin(x)
        y.sum().backward()  # gradients flow through every path
        assert torch.allclose(y, expected, atol=1e-6) and lin.weight.grad is not None
        lin.weight.grad = None


def test_bad_inputs_are_refused_before_any_computation(hub_checkpoint):
    model = VipLlava.from_pretrained(hub_checkpoint, verbose=False)
    ids, mask, px = inputs([(0, 5, 1, 6)])
    with pytest.raises(ValueError, match=r"input_ids must be a non-empty integer tensor \(B, T\).*input_ids\[None\]"):
        model(ids[0], px)
    with pytest.raises(ValueError, match="outside the model's vocabulary 0..127"):
        model(torch.full_like(ids, 500), px)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 5\) but input_ids \(1, \d+\)"):
        model(ids, px, mask[:, :5])
    with pytest.raises(ValueError, match=r"pixel_values must be a float tensor \(N, 3, 42, 42\).*got torch.float32 \(1, 3, 40, 40\)"):
        model(ids, px[:, :, :40, :40])
    with pytest.raises(ValueError, match=r"pixel_values\[None\]"):
        model(ids, px[0])
    right_padded = torch.ones_like(mask)
    right_padded[:, -1] = 0
    with pytest.raises(ValueError, match="pad on the left"):
        model.generate(ids, px, right_padded, max_new_tokens=2)


def test_transformers_habits(hub_checkpoint):
    model = VipLlava.from_pretrained(hub_checkpoint, torch_dtype=torch.bfloat16, verbose=False)
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    with pytest.raises(ValueError, match="disagree"):
        VipLlava.from_pretrained(hub_checkpoint, dtype="float32", torch_dtype="bfloat16", verbose=False)
