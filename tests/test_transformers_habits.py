"""Calls transformers users make out of habit, each against transformers making the same call: generate's
max_length / pad_token_id / eos_token_id, the generation config and its top_k, processor(padding=True),
apply_chat_template(tokenize=True), processor.tokenizer, processor.save_pretrained, num_parameters, device_map."""
import shutil

import pytest
import tokenizers
import torch
from PIL import Image

from conftest import PAD_TOKEN, inputs, legacy_config, reference_model, write_checkpoint
from test_processor import IMAGES, clip_reference, ours, pair  # noqa: F401  (fixtures: both processors)
from processor import VipLlavaProcessor
from vipllava import VipLlava


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers' model, ours) from one folder that transformers' save_pretrained wrote, with a
    generation_config.json that sets some fields (the rest take transformers' defaults)."""
    reference = reference_model(seed=1, text=dict(initializer_range=0.2))  # sharp: greedy paths vary
    folder = tmp_path_factory.mktemp("habits")
    write_checkpoint(reference, folder, "transformers-5.x")
    return reference, VipLlava.from_pretrained(folder, verbose=False), folder


def reference_new(reference, ids, mask, px, **kw):
    images = {} if px is None else {"pixel_values": px}
    with torch.no_grad():
        return reference.generate(input_ids=ids, attention_mask=mask, **images, **kw)[:, ids.shape[1]:]


# ---------------------------------------------------------------------------- generate
def test_generate_max_length_pad_token_id_and_eos_token_id_as_transformers(models):
    reference, model, _ = models
    ids, mask, px = inputs([(0, 4, 1, 9), (6, 3, 1, 4), (11, 2, 1, 2)], seed=3)
    T = ids.shape[1]
    greedy = model.generate(ids, px, mask, max_new_tokens=16, eos_token_id=[])
    # EOS ids that greedy decoding meets early in some rows: those rows stop, and are padded with pad_token_id.
    for eos in (int(greedy[0, 3]), [int(greedy[0, 5]), int(greedy[2, 2])]):
        ours = model.generate(ids, px, mask, max_length=T + 12, pad_token_id=7, eos_token_id=eos)
        ref = reference_new(reference, ids, mask, px, do_sample=False, max_length=T + 12, pad_token_id=7,
                            eos_token_id=eos)
        assert (ours == 7).any(), "degenerate test: no row stopped early"
        assert torch.equal(ours, ref)
    with pytest.raises(ValueError, match=f"max_length={T} counts the prompt's {T} tokens too"):
        model.generate(ids, px, mask, max_length=T)


def test_generation_config_is_read_with_transformers_defaults(hub_checkpoint, tmp_path):
    from transformers import GenerationConfig

    defaults = GenerationConfig._get_default_generation_params()  # what transformers uses for fields left unset
    folder = shutil.copytree(hub_checkpoint, tmp_path / "with-generation-config")
    GenerationConfig(do_sample=True, top_k=7, temperature=0.6, repetition_penalty=1.2, max_new_tokens=9,
                     eos_token_id=[2, 5], pad_token_id=PAD_TOKEN).save_pretrained(folder)
    for ours, theirs in [(VipLlava.from_pretrained(folder, verbose=False), GenerationConfig.from_pretrained(folder)),
                         (VipLlava.from_pretrained(hub_checkpoint, verbose=False), GenerationConfig())]:  # no file
        for name in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_length",
                     "max_new_tokens", "eos_token_id", "pad_token_id"):
            value = getattr(theirs, name)
            assert getattr(ours.generation_config, name) == (defaults.get(name) if value is None else value), name
    assert ours.generation_config.top_k == 50 and ours.generation_config.do_sample is False


def test_generate_follows_the_checkpoints_generation_config(models, tmp_path):
    """A generation_config.json that samples with top_k=1 (greedy in effect) and 6 new tokens: generate() with
    no arguments does what transformers' does; explicit arguments win."""
    reference, _, _ = models
    reference.generation_config.update(do_sample=True, top_k=1, max_new_tokens=6, eos_token_id=[],
                                       pad_token_id=PAD_TOKEN)
    try:
        folder = write_checkpoint(reference, tmp_path / "sampling", "transformers-5.x")
        ids, mask, px = inputs([(0, 5, 1, 6), (3, 4, 1, 4)], seed=5)
        ref = reference_new(reference, ids, mask, px)
    finally:
        reference.generation_config.update(do_sample=None, top_k=None, max_new_tokens=None, eos_token_id=None)
    model = VipLlava.from_pretrained(folder, verbose=False)
    ours = model.generate(ids, px, mask)
    assert ours.shape == (2, 6) and torch.equal(ours, ref)
    assert model.generate(ids, px, mask, max_new_tokens=9).shape == (2, 9)  # explicit wins


def test_do_sample_keeps_the_generation_configs_top_k_as_transformers(models):
    """One sampled step over 400 identical rows at a flat temperature: transformers and we draw only among the 50
    most likely tokens (generation config default); top_k=0 given explicitly samples the whole vocabulary."""
    reference, model, _ = models
    ids, mask, _ = inputs([(0, 9, 0, 0)], seed=2)
    ids, mask = ids.expand(400, -1), mask.expand(400, -1)
    with torch.no_grad():
        top50 = set(reference(input_ids=ids[:1]).logits[0, -1].topk(50).indices.tolist())
    torch.manual_seed(0)
    theirs = reference_new(reference, ids, mask, None, do_sample=True, temperature=30.0, max_new_tokens=1)
    ours = model.generate(ids, None, mask, do_sample=True, temperature=30.0, max_new_tokens=1, seed=0)
    unrestricted = model.generate(ids, None, mask, do_sample=True, temperature=30.0, max_new_tokens=1, seed=0, top_k=0)
    assert set(theirs[:, 0].tolist()) <= top50 and set(ours[:, 0].tolist()) <= top50
    assert len(set(ours[:, 0].tolist())) > 25  # it did sample, among many of the 50
    assert not set(unrestricted[:, 0].tolist()) <= top50


# ---------------------------------------------------------------------------- the model
def test_num_parameters_as_transformers(reference, hub_checkpoint):
    model = VipLlava.from_pretrained(hub_checkpoint, verbose=False)
    for kw in ({}, {"exclude_embeddings": True}):
        assert model.num_parameters(**kw) == reference.num_parameters(**kw), kw
    assert model.num_parameters(only_trainable=True) == 0  # from_pretrained gives an inference model
    int8 = VipLlava.from_pretrained(hub_checkpoint, quantize="int8", verbose=False)
    assert int8.num_parameters() == reference.num_parameters()  # a quantized layer counts its weights as before


@pytest.mark.parametrize("device_map", ["auto", "cpu", {"": "cpu"}])
def test_device_map_onto_one_device_as_transformers(models, device_map):
    from transformers import VipLlavaForConditionalGeneration

    _, _, folder = models
    if device_map == "auto" and torch.cuda.is_available():
        pytest.skip("compared on a CPU-only machine; with a GPU both put the model on cuda:0")
    theirs = VipLlavaForConditionalGeneration.from_pretrained(folder, device_map=device_map).eval()
    ours = VipLlava.from_pretrained(folder, device_map=device_map, verbose=False)
    assert ours.device == theirs.device == torch.device("cpu")
    ids, mask, px = inputs([(0, 5, 1, 6)], seed=1)
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    assert (ours(ids, px, mask).logits - ref).abs().max() < 1e-4


def test_device_map_errors(hub_checkpoint):
    with pytest.raises(ValueError, match=r"places the model's parts on 2 devices .*keeps the whole model on one"):
        VipLlava.from_pretrained(hub_checkpoint, device_map={"vision_tower": "cpu", "language_model": 0}, verbose=False)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="disagree"):
            VipLlava.from_pretrained(hub_checkpoint, device_map="cuda", device="cpu", verbose=False)
    else:  # the same clear error as device="cuda"
        with pytest.raises(ValueError, match="CUDA is not available here"):
            VipLlava.from_pretrained(hub_checkpoint, device_map="cuda", verbose=False)


# ---------------------------------------------------------------------------- the processor
TEXTS = ["<image>\nWhat is in the box?", "Hello there, how are you today?"]


def photo():
    return Image.open(IMAGES / "chelsea.png")


def test_processor_accepts_padding_true_and_pads_on_the_tokenizers_side(pair):
    ours, reference = pair
    for side in ("left", "right"):
        ours.tokenizer.padding_side = reference.tokenizer.padding_side = side
        try:
            mine = ours(TEXTS, images=[photo()], padding=True)
            theirs = reference(text=TEXTS, images=[photo()], padding=True, return_tensors="pt")
        finally:
            ours.tokenizer.padding_side = reference.tokenizer.padding_side = "left"
        assert torch.equal(mine["input_ids"], theirs["input_ids"]) and (mine["attention_mask"] == 0).any()
        assert torch.equal(mine["attention_mask"], theirs["attention_mask"])
    with pytest.raises(ValueError, match="only padding to the longest row"):
        ours(TEXTS, images=[photo()], padding="max_length")


def test_apply_chat_template_tokenize_and_return_dict_as_transformers(pair):
    ours, reference = pair
    for key, value in (("image", photo()), ("path", str(IMAGES / "chelsea.png"))):
        conversation = [{"role": "user", "content": [{"type": "image", key: value},
                                                     {"type": "text", "text": "What is this?"}]}]
        kw = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        mine, theirs = ours.apply_chat_template(conversation, **kw), reference.apply_chat_template(conversation, **kw)
        assert set(mine) == {"input_ids", "attention_mask", "pixel_values"}
        assert torch.equal(mine["input_ids"], theirs["input_ids"])
        assert torch.equal(mine["attention_mask"], theirs["attention_mask"])
        assert (mine["pixel_values"] - theirs["pixel_values"]).abs().max() <= 1e-5
        ids = ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        assert torch.equal(ids, theirs["input_ids"])


def test_tokenizer_has_transformers_names_and_the_raw_one_stays_reachable(pair):
    ours, reference = pair
    mine, theirs = ours.tokenizer, reference.tokenizer
    assert isinstance(mine.backend_tokenizer, tokenizers.Tokenizer)
    assert type(mine.backend_tokenizer) is type(theirs.backend_tokenizer)
    for name in ("padding_side", "pad_token_id", "eos_token_id", "bos_token_id", "pad_token", "eos_token"):
        assert getattr(mine, name) == getattr(theirs, name), name
    assert len(mine) == len(theirs) and mine.token_to_id("</s>") == theirs.eos_token_id  # the backend's own call
    text = "The café has a cat. 猫!"
    for special in (True, False):
        assert mine.encode(text, add_special_tokens=special) == theirs.encode(text, add_special_tokens=special)
    assert mine(text) == dict(theirs(text))
    assert mine(["hi", text], padding=True) == dict(theirs(["hi", text], padding=True))
    batch, ref_batch = mine(["hi", text], return_tensors="pt"), theirs(["hi", text], padding=True, return_tensors="pt")
    assert all(torch.equal(batch[k], ref_batch[k]) for k in ("input_ids", "attention_mask"))
    ids = ref_batch["input_ids"]
    for skip in (True, False):
        assert mine.decode(ids[1], skip_special_tokens=skip) == theirs.decode(ids[1], skip_special_tokens=skip)
        assert mine.batch_decode(ids, skip_special_tokens=skip) == theirs.batch_decode(ids, skip_special_tokens=skip)


def test_processor_save_pretrained_loads_in_transformers_and_back(pair, tmp_path):
    from transformers import LlavaProcessor

    ours, _ = pair
    ours.save_pretrained(tmp_path)
    theirs, again = LlavaProcessor.from_pretrained(tmp_path), VipLlavaProcessor.from_pretrained(tmp_path, "crop")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = ours.apply_chat_template(conversation, add_generation_prompt=True)
    assert theirs.apply_chat_template(conversation, add_generation_prompt=True) == prompt
    expected = ours([prompt, "Hi"], images=[photo()])
    for other in (theirs(text=[prompt, "Hi"], images=[photo()], padding=True, return_tensors="pt"),
                  again([prompt, "Hi"], images=[photo()])):
        assert torch.equal(other["input_ids"], expected["input_ids"])
        assert (other["pixel_values"] - expected["pixel_values"]).abs().max() <= 1e-5
    assert theirs.tokenizer.padding_side == "left" and again.context_length == ours.context_length
