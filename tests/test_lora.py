"""The training loss and LoRA against transformers + PEFT (the oracle) on a tiny float32 checkpoint."""
import json

import pytest
import torch
from safetensors.torch import load_file

import lora
from conftest import IMAGE_TOKEN, inputs, legacy_config, reference_model, write_checkpoint
from vipllava import VipLlava

LOSS_RTOL, GRAD_RTOL, LOGITS_TOL = 1e-5, 1e-4, 1e-5
BATCH = [(0, 5, 1, 9), (4, 2, 1, 8)]  # one left-padded row; each with an image and text after it
PEFT_TARGETS = lora.TARGET_REGEX


def labels_for(ids, mask, seed=0):
    """Labels as training makes them: -100 on padding, image positions and a random half of the text."""
    g = torch.Generator().manual_seed(seed)
    labels = ids.clone()
    labels[(mask == 0) | (ids == IMAGE_TOKEN) | (torch.rand(ids.shape, generator=g) < 0.5)] = -100
    return labels


def reference_loss(model, ids, mask, px, labels):
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, pixel_values=px, position_ids=position_ids, labels=labels).loss


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    return write_checkpoint(reference_model(), folder, "hub", config=legacy_config(dtype="float32"))


@pytest.fixture()
def adapter(checkpoint, tmp_path):
    """An adapter we save: r 4, alpha 8, lora_B random (non-zero), the projector changed too."""
    model = VipLlava.from_pretrained(checkpoint, verbose=False)
    config = lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    lora.add_lora(model, config, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))
        for p in model.multi_modal_projector.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return lora.save_adapter(model, config, tmp_path / "adapter", str(checkpoint)), model


def peft_model(folder, trainable=False):
    from peft import PeftModel

    return PeftModel.from_pretrained(reference_model(), folder, is_trainable=trainable)


def test_loss_matches_transformers(checkpoint):
    ref, ours = reference_model(), VipLlava.from_pretrained(checkpoint, verbose=False)
    ids, mask, px = inputs(BATCH)
    labels = labels_for(ids, mask)
    out = ours(ids, px, mask, labels=labels)
    assert out.logits is None  # no (B, T, vocab) logits are kept with labels
    with torch.no_grad():
        assert rel(out.loss, reference_loss(ref, ids, mask, px, labels)) <= LOSS_RTOL
    # num_items_in_batch divides the sum, as transformers' loss does under gradient accumulation
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0), num_items_in_batch=torch.tensor(50)).loss
    assert rel(ours(ids, px, mask, labels=labels, num_items_in_batch=torch.tensor(50)).loss, theirs) <= LOSS_RTOL


def test_adapter_file_has_peft_keys_and_loads_into_peft(adapter):
    from peft import get_peft_model_state_dict

    folder, ours = adapter
    saved = load_file(folder / "adapter_model.safetensors")
    assert "base_model.model.model.language_model.layers.0.mlp.down_proj.lora_A.weight" in saved
    assert "base_model.model.model.multi_modal_projector.linear_2.weight" in saved
    assert not any("vision_tower" in k or "default" in k for k in saved)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == PEFT_TARGETS
    peft = peft_model(folder)
    theirs = get_peft_model_state_dict(peft)  # what PEFT holds after loading, in its file's key names
    assert sorted(theirs) == sorted(saved)  # no missing, no unexpected key
    for k, v in saved.items():
        assert torch.equal(theirs[k], v), k


def test_peft_logits_equal_ours_with_the_adapter_merged_and_not(adapter, checkpoint):
    folder, _ = adapter
    ids, mask, px = inputs(BATCH)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = peft_model(folder)(input_ids=ids, attention_mask=mask, pixel_values=px,
                                    position_ids=position_ids).logits
    kept = VipLlava.from_pretrained(checkpoint, adapter=folder, verbose=False)
    merged = VipLlava.from_pretrained(checkpoint, adapter=folder, merge=True, verbose=False)
    assert lora.lora_modules(kept) and not lora.lora_modules(merged)
    base = VipLlava.from_pretrained(checkpoint, verbose=False)
    real = mask.bool()
    with torch.no_grad():
        a, b, c = (m(ids, px, mask).logits[real] for m in (kept, merged, base))
    assert (a - theirs[real]).abs().max() <= LOGITS_TOL
    assert (a - b).abs().max() <= LOGITS_TOL
    assert (a - c).abs().max() > 1e-3  # the adapter really changes the model


def test_zero_lora_b_gives_the_base_logits_exactly(checkpoint):
    ids, mask, px = inputs(BATCH)
    base = VipLlava.from_pretrained(checkpoint, verbose=False)
    with torch.no_grad():
        want = base(ids, px, mask).logits
        lora.add_lora(base, lora.LoraConfig(r=8, lora_alpha=16))
        assert torch.equal(base(ids, px, mask).logits, want)


def test_save_pretrained_writes_the_merged_model(adapter, checkpoint, tmp_path):
    folder, _ = adapter
    kept = VipLlava.from_pretrained(checkpoint, adapter=folder, verbose=False)
    kept.save_pretrained(tmp_path / "merged")
    merged = VipLlava.from_pretrained(tmp_path / "merged", verbose=False)
    ids, mask, px = inputs(BATCH)
    with torch.no_grad():
        assert (kept(ids, px, mask).logits - merged(ids, px, mask).logits).abs().max() <= LOGITS_TOL


def test_loss_and_gradients_match_peft(adapter, checkpoint):
    """Same LoRA weights (B non-zero), same labels: the loss within 1e-5 and every LoRA and projector gradient
    within 1e-4 (relative, as the norm of the difference over the norm)."""
    folder, _ = adapter
    ids, mask, px = inputs(BATCH, seed=3)
    labels = labels_for(ids, mask, seed=3)
    peft = peft_model(folder, trainable=True)
    theirs = reference_loss(peft, ids, mask, px, labels)
    theirs.backward()
    ours = VipLlava.from_pretrained(checkpoint, adapter=folder, verbose=False)
    trainable = [p for n, p in ours.named_parameters() if "lora_" in n or n.startswith("multi_modal_projector.")]
    for p in trainable:
        p.requires_grad_(True)
    loss = ours(ids, px, mask, labels=labels).loss
    loss.backward()
    assert rel(loss, theirs) <= LOSS_RTOL
    their_grads = {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}
    n_checked = 0
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        key = lora.PREFIX + lora.transformers_name(name)
        key = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        key = key.replace(".multi_modal_projector.", ".multi_modal_projector.modules_to_save.default.")
        assert rel(p.grad, their_grads[key]) <= GRAD_RTOL, name
        n_checked += 1
    assert n_checked == len(their_grads) == 2 * 7 * 2 + 6  # 2 layers x 7 projections x (A, B) + the projector's 6
