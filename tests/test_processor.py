"""The processor against transformers (the reference): pixels vs CLIPImageProcessor, ids vs LlavaProcessor,
prompts vs the hub's Jinja chat template, decoding vs the tokenizer; then streaming and every error."""
import io
import json
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import processor as P
import tiny_checkpoint
from processor import VipLlavaProcessor, load_image, preprocess, render_chat
from visual_prompts import draw_visual_prompt

IMAGES = Path(__file__).parent / "images"
PHOTOS = ["chelsea.png", "coffee.png", "horse.png", "camera.png"]  # 451x300 RGB, 600x400 RGB, 400x328 RGBA, 512x512 L
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PIXEL_TOL = 1e-5
# The hub's chat_template.json of llava-hf/vip-llava-7b-hf, copied verbatim from the facts file.
JINJA = """{% for message in messages %}{% if message['role'] == 'user' %}{{ '###Human: '}}{% elif message['role'] == 'assistant' %}{{ '###' + message['role'].title() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ '###Assistant:' }}{% endif %}"""
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def clip_reference(size):
    from transformers import CLIPImageProcessor  # the PIL backend here: torchvision is not installed

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
                              do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                              image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


@pytest.fixture(scope="module")
def clip336():
    return clip_reference(336)


def reference_pixels(clip, image) -> torch.Tensor:
    return clip(images=[image], return_tensors="pt")["pixel_values"][0]  # (3, H, W)


def photo(name) -> Image.Image:
    return Image.open(IMAGES / name)


def write_checkpoint(folder: Path, legacy=True, image_size=28, context=None, config=True, **config_extra) -> dict:
    """Processor files + the minimal config.json the model writer would put next to them."""
    info = tiny_checkpoint.write_processor_files(folder, image_size=image_size, patch_size=14, legacy=legacy)
    if config:
        text_config = {} if context is None else {"max_position_embeddings": context}
        config = {"image_seq_length": info["image_seq_length"], "image_token_index": info["image_token_index"],
                  "text_config": text_config, **config_extra}
        (folder / "config.json").write_text(json.dumps(config))
    return info


@pytest.fixture(scope="module", params=["legacy", "metaspace"])
def pair(request, tmp_path_factory):
    """(ours, transformers' LlavaProcessor) on the same tiny checkpoint: 28x28 images, patch 14 -> 4 tokens."""
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp(request.param)
    write_checkpoint(folder, legacy=request.param == "legacy")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", pad_token="<pad>", padding_side="left")
    reference = LlavaProcessor(image_processor=clip_reference(28), tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=JINJA)
    return VipLlavaProcessor.from_pretrained(folder, image_mode="crop"), reference


@pytest.fixture(scope="module")
def ours(pair):
    return pair[0]


# ---------------------------------------------------------------------------- pixels
def test_library_never_imports_transformers():
    code = "import processor, tiny_checkpoint, sys; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def derived_modes():
    """The photos in the other modes users meet: palette (with and without transparency), LA, CMYK, I;16."""
    cat, camera = photo("chelsea.png").convert("RGB"), photo("camera.png").convert("L")
    palette = cat.quantize(64)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    la = Image.merge("LA", [camera, camera.point(lambda v: 255 - v)])
    deep = Image.fromarray(np.asarray(camera, np.uint16) * 2)  # I;16: values up to 510
    return {"P": palette, "P+transparency": transparent, "LA": la, "CMYK": cat.convert("CMYK"), "I;16": deep}


@pytest.mark.parametrize("name", PHOTOS)
def test_crop_matches_clip_image_processor_on_photos(clip336, name):
    image = photo(name)
    ours = preprocess(IMAGES / name, mode="crop")
    assert ours.shape == (3, 336, 336) and ours.dtype == torch.float32
    assert (ours - reference_pixels(clip336, image)).abs().max() <= PIXEL_TOL


@pytest.mark.parametrize("mode", ["P", "P+transparency", "LA", "CMYK", "I;16"])
def test_crop_matches_clip_image_processor_in_every_mode(clip336, mode):
    image = derived_modes()[mode]
    assert image.mode == mode.split("+")[0]
    assert (preprocess(image, mode="crop") - reference_pixels(clip336, image)).abs().max() <= PIXEL_TOL


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(P.to_rgb(image)).tolist() == [[[255, 255, 255]] * 4] * 4


@pytest.mark.parametrize("name", ["chelsea.png", "horse.png"])
def test_numpy_arrays_match_clip_image_processor(clip336, name):
    array = np.asarray(photo(name))  # (H, W, 3) and (H, W, 4)
    assert (preprocess(array, mode="crop") - reference_pixels(clip336, array)).abs().max() <= PIXEL_TOL


@pytest.mark.parametrize("w,h", [(1, 40), (40, 1), (1000, 20), (20, 1000), (3, 2), (1, 1), (337, 335), (5, 9), (9, 5)])
def test_crop_matches_clip_image_processor_on_odd_sizes(clip336, w, h):
    rng = np.random.default_rng(w * 1000 + h)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for mode in ("crop", "pad"):
        assert preprocess(image, mode=mode).shape == (3, 336, 336)
    assert (preprocess(image, mode="crop") - reference_pixels(clip336, image)).abs().max() <= PIXEL_TOL


def pad_to_square(image: Image.Image) -> Image.Image:
    """ViP-LLaVA's expand2square, written independently of the library: mean colour (122, 116, 104)."""
    from transformers.image_transforms import convert_to_rgb

    rgb = Image.fromarray(convert_to_rgb(image, return_numpy=True))
    side = max(rgb.size)
    canvas = Image.new("RGB", (side, side), (122, 116, 104))
    canvas.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    return canvas


@pytest.mark.parametrize("name", PHOTOS + ["tall", "wide", "odd"])
def test_pad_matches_clip_image_processor_on_a_padded_square(clip336, name):
    sizes = {"tall": (33, 100), "wide": (700, 41), "odd": (5, 2)}
    image = photo(name) if name in PHOTOS else Image.fromarray(
        np.random.default_rng(1).integers(0, 256, sizes[name][::-1] + (3,), dtype=np.uint8))
    assert (preprocess(image, mode="pad") - reference_pixels(clip336, pad_to_square(image))).abs().max() <= PIXEL_TOL


def test_pad_keeps_a_marker_near_the_long_edge_that_crop_cuts_off():
    image = Image.new("RGB", (600, 200), (255, 255, 255))
    image.paste((255, 0, 0), (0, 80, 40, 120))  # a red box at the left edge
    red, green = (1 - CLIP_MEAN[0]) / CLIP_STD[0], (0 - CLIP_MEAN[1]) / CLIP_STD[1]  # pure red, normalized

    def has_red(x):  # (3, H, W)
        return bool((((x[0] - red).abs() < 0.02) & ((x[1] - green).abs() < 0.02)).any())

    assert has_red(preprocess(image, mode="pad")) and not has_red(preprocess(image, mode="crop"))


def test_exif_orientation_is_applied(tmp_path):
    image = photo("chelsea.png").convert("RGB")  # 451x300
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "sideways.png", exif=exif)
    upright = load_image(tmp_path / "sideways.png")
    assert upright.size == (300, 451)
    assert np.array_equal(np.asarray(upright), np.asarray(image.transpose(Image.Transpose.ROTATE_270)))


def test_processor_reads_preprocessor_config_and_defaults_to_pad(tmp_path, clip336):
    write_checkpoint(tmp_path, image_size=336)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config["image_mean"], config["image_std"] = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = VipLlavaProcessor.from_pretrained(tmp_path)
    image = photo("coffee.png")
    pixels = processor("<image>\nWhat is this?", image)["pixel_values"]  # (1, 3, 336, 336)
    padded = Image.new("RGB", (600, 600), (127, 127, 127))  # int(0.5 * 255) per channel
    padded.paste(image, (0, 100))
    from transformers import CLIPImageProcessor

    reference = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
                                   image_mean=[0.5] * 3, image_std=[0.25] * 3)
    assert pixels.shape == (1, 3, 336, 336)
    assert (pixels[0] - reference_pixels(reference, padded)).abs().max() <= PIXEL_TOL
    crop = processor("<image>", image, image_mode="crop")["pixel_values"][0]
    assert (crop - reference_pixels(reference, image)).abs().max() <= PIXEL_TOL


# ---------------------------------------------------------------------------- tokens
PROMPTS = [
    "USER: <image>\nWhat is shown in this image? ASSISTANT:",
    SYSTEM + "###Human: <image>\nWhat is the color of the object inside the red rectangle?###Assistant:",
    "<image>\n<image>\nCompare the two pictures.",
    "Café crème brûlée à la façade, naïve Übermensch.",
    "这是什么？猫が座っています。图片里有一只狗。",
    "I love 🐱 and 🍕 — don't you? 👍🏽",
    "line one\nline two\n\n  indented line\tand a tab\n",
    "a<image>b and then <image> again",
    "  two leading spaces and two trailing  ",
    "Hello",
]


def images_for(text):
    return [photo(PHOTOS[i % len(PHOTOS)]) for i in range(text.count("<image>"))]


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_single_prompt_matches_llava_processor(pair, i):
    ours, reference = pair
    text = PROMPTS[i]
    images = images_for(text) or None
    mine = ours(text, images)
    theirs = reference(text=text, images=images, return_tensors="pt")
    assert mine["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert mine["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    if images:
        assert (mine["pixel_values"] - theirs["pixel_values"]).abs().max() <= PIXEL_TOL
    else:
        assert "pixel_values" not in mine and "pixel_values" not in theirs


def test_left_padded_batch_matches_llava_processor(pair):
    ours, reference = pair
    images = [image for text in PROMPTS for image in images_for(text)]
    mine = ours(PROMPTS, images)
    theirs = reference(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    assert mine["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert mine["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    assert mine["pixel_values"].shape == (len(images), 3, 28, 28)
    assert (mine["pixel_values"] - theirs["pixel_values"]).abs().max() <= PIXEL_TOL
    assert (mine["input_ids"][:, 0] == ours.pad_token_id).any() and (mine["attention_mask"][:, -1] == 1).all()
    # images given as a list per text: the same result
    per_text = ours(PROMPTS, [images_for(t) for t in PROMPTS])
    assert per_text["input_ids"].tolist() == mine["input_ids"].tolist()


def test_legacy_tokenizer_puts_a_space_piece_after_image(tmp_path):
    info = write_checkpoint(tmp_path)
    processor = VipLlavaProcessor.from_pretrained(tmp_path)
    ids = processor("USER: <image>\nHi", photo("chelsea.png"))["input_ids"][0].tolist()
    space, newline = processor.tokenizer.token_to_id("▁"), processor.tokenizer.token_to_id("<0x0A>")
    image = info["image_token_index"]
    # as on the real vocabulary: ..., 29871, 32000 x 576, 29871, 13, ...
    assert ids[0] == 1 and ids.count(image) == 4
    assert ids[ids.index(image) - 1] == space and ids[ids.index(image) + 4: ids.index(image) + 6] == [space, newline]


def test_image_seq_length_falls_back_to_the_preprocessor_sizes(tmp_path):
    info = write_checkpoint(tmp_path, image_size=336, config=False)
    processor = VipLlavaProcessor.from_pretrained(tmp_path)
    assert info["image_seq_length"] == processor.image_seq_length == 576 and processor.context_length == 2048
    write_checkpoint(tmp_path, image_size=336, context=4096)
    processor = VipLlavaProcessor.from_pretrained(tmp_path)
    assert processor.image_seq_length == 576 and processor.context_length == 4096
    ids = processor("<image>\nHi", np.zeros((10, 20, 3), np.uint8))["input_ids"]
    assert (ids == info["image_token_index"]).sum() == 576


# ---------------------------------------------------------------------------- chat template
def user(*content):
    return {"role": "user", "content": list(content)}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def system(*content):
    return {"role": "system", "content": list(content)}


IMG = {"type": "image"}


def text(t):
    return {"type": "text", "text": t}


DOCUMENTED = [user(IMG, text("What’s shown in this image?")), assistant("This image shows a red stop sign."),
              user(text("Describe the image in more details."))]
CONVERSATIONS = [
    DOCUMENTED,
    [user(IMG, text("What is this?"))],
    [system(text(SYSTEM)), user(IMG, text("<prompt>"))],
    [user(IMG, IMG, IMG, text("Which of the three is red?"))],
    [user(text("Describe this: "), IMG)],  # text before the image: the image is still rendered first
    [user(text("Part one. "), IMG, text("Part two."))],
    [user(IMG, text("Hi")), assistant("Hello!"), user(IMG, text("And this one?")), assistant("A dog."),
     user(text("Thanks"))],
    [user(text("Only text, no image."))],
    [user(IMG)],
    [system(text("Be brief.")), user(text("q1")), assistant("a1"), user(IMG, text("q2"))],
    [system(IMG, text("A system message with an image."))],
    [user(IMG, text("Café 猫 🐱\nnew line")), assistant("")],
    [assistant("An assistant turn first.")],
]


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_the_hub_jinja_template(pair, i, add_generation_prompt):
    ours, reference = pair
    conversation = CONVERSATIONS[i]
    expected = reference.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_documented_outputs(ours):
    assert P.VIPLLAVA_CHAT_TEMPLATE == JINJA
    assert ours.apply_chat_template(DOCUMENTED, add_generation_prompt=True) == (
        "###Human: <image>\nWhat’s shown in this image?###Assistant: This image shows a red stop sign.###Human: "
        "Describe the image in more details.###Assistant:")
    assert ours.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True) == (
        SYSTEM + "###Human: <image>\n<prompt>###Assistant:")
    # a plain string content is one text item (the Jinja template would render nothing for it)
    assert ours.apply_chat_template([{"role": "user", "content": "Hi"}]) == "###Human: Hi"


def test_llava_v1_template():
    conversation = [user(IMG, text("q1")), assistant("a1"), user(text("q2"))]
    expected = SYSTEM + " USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    assert render_chat(conversation, True, "llava_v1") == expected
    assert render_chat([system(text("Sys.")), user(text("q"))], False, "llava_v1") == "Sys. USER: q "


def test_unknown_checkpoint_template_must_be_chosen_explicitly(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    processor = VipLlavaProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not the ViP-LLaVA one.*template='vipllava'"):
        processor.apply_chat_template(DOCUMENTED)
    assert processor.apply_chat_template(DOCUMENTED, template="vipllava").startswith("###Human: <image>\n")


# ---------------------------------------------------------------------------- decoding
def test_decode_matches_the_reference_tokenizer(pair):
    ours, reference = pair
    batch = ours(PROMPTS, [image for t in PROMPTS for image in images_for(t)])["input_ids"]
    for skip in (False, True):
        expected = reference.batch_decode(batch, skip_special_tokens=skip)
        assert ours.batch_decode(batch, skip_special_tokens=skip) == expected
    eos = ours.tokenizer.token_to_id("</s>")
    ids = ours("Hello world")["input_ids"][0].tolist() + [eos]
    assert ours.decode(ids) == "<s> Hello world</s>"
    assert ours.decode(ids, skip_special_tokens=True) == "Hello world"  # the leading "▁" of the first word goes


STREAM_TEXTS = ["猫 😀 crème 🐱🍕 中文\n", "👍🏽 tschüß — 東京タワー 2024!", "\n\nnew lines first",
                "Hello world"]


@pytest.mark.parametrize("t", STREAM_TEXTS)
def test_stream_decoder_joins_to_decode(ours, t):
    ids = ours(t)["input_ids"][0].tolist() + [ours.tokenizer.token_to_id("</s>")]
    tokens = [ours.tokenizer.id_to_token(i) for i in ids]
    stream = ours.stream_decoder()
    pieces = [stream.push(torch.tensor(i)) for i in ids] + [stream.flush()]
    assert "".join(pieces) == ours.decode(ids, skip_special_tokens=True) == t.lstrip(" ")
    assert not any("\ufffd" in p for p in pieces)
    if "😀" in t:
        assert any(tok.startswith("<0x") for tok in tokens)  # the emoji really is split into byte tokens
    # text is emitted as soon as it is final: at the first token after a run of byte tokens, if not before
    for k, tok in enumerate(tokens[:-1]):
        if not tok.startswith("<0x") and ours.decode(ids[: k + 1], True) != ours.decode(ids[:k], True):
            assert "".join(pieces[: k + 1]) == ours.decode(ids[: k + 1], True)


def test_stream_decoder_on_random_ids_including_invalid_bytes(ours):
    rng = random.Random(0)
    n = ours.tokenizer.get_vocab_size()
    for _ in range(300):
        ids = [rng.choice([rng.randrange(n), rng.randrange(3, 259), rng.randrange(3, 259), 1, 2])
               for _ in range(rng.randrange(1, 16))]
        for skip in (True, False):
            stream = ours.stream_decoder(skip_special_tokens=skip)
            assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == ours.decode(ids, skip)


# ---------------------------------------------------------------------------- errors
def test_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image file .*missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(IsADirectoryError, match="is a folder, not an image file"):
        load_image(tmp_path)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png is not an image file"):
        load_image(tmp_path / "notes.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jpg is not an image file"):
        load_image(str(tmp_path / "empty.jpg"))
    data = (IMAGES / "chelsea.png").read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="half.png is truncated"):
        load_image(tmp_path / "half.png")
    with pytest.raises(ValueError, match=r"zero size \(0x5\)"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match=r"zero size \(7x0\)"):
        preprocess(np.zeros((0, 7, 3), np.uint8))
    with pytest.raises(OSError, match="could not fetch the image http://127.0.0.1:9/x.png"):
        load_image("http://127.0.0.1:9/x.png")
    with pytest.raises(TypeError, match="uint8 of shape"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="cannot use a int as an image"):
        load_image(3)
    with pytest.raises(ValueError, match="image_mode must be 'pad'.*got 'square'"):
        preprocess(photo("chelsea.png"), mode="square")


def test_image_count_errors(ours):
    cat = photo("chelsea.png")
    with pytest.raises(ValueError, match=r"the text has 2 <image> token\(s\) but 1 image\(s\)"):
        ours("<image> and <image>", cat)
    with pytest.raises(ValueError, match=r"the text has 0 <image> token\(s\) but 1 image\(s\)"):
        ours("no image here", [cat])
    with pytest.raises(ValueError, match=r"the text has 1 <image> token\(s\) but 0 image\(s\)"):
        ours(["<image>", "text"])
    with pytest.raises(ValueError, match=r"text 1 has 1 <image> token\(s\) but 2 image\(s\)"):
        ours(["<image>", "<image>"], [[cat], [cat, cat]])
    with pytest.raises(ValueError, match="3 lists of images for 2 texts"):
        ours(["<image>", "<image>"], [[cat], [cat], [cat]])


def test_context_length_error(tmp_path):
    write_checkpoint(tmp_path, context=16)
    processor = VipLlavaProcessor.from_pretrained(tmp_path)
    assert processor("<image>\nShort.", photo("chelsea.png"))["input_ids"].shape[1] <= 16
    with pytest.raises(ValueError, match=r"prompt 1 is 2\d tokens long .* context of 16"):
        processor(["<image>", "<image> <image> <image> <image> <image>"], [photo("chelsea.png")] * 6)


def test_conversation_errors(ours):
    with pytest.raises(ValueError, match="conversation is empty"):
        ours.apply_chat_template([])
    with pytest.raises(ValueError, match="message 1 has role 'tool'"):
        ours.apply_chat_template([user(text("hi")), {"role": "tool", "content": [text("x")]}])
    with pytest.raises(ValueError, match="message 0 content must be"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        ours.apply_chat_template(DOCUMENTED, template="chatml")


def test_typed_image_token_is_refused_next_to_image_items(ours):
    # With image items, a typed <image> would be an image slot too many ("2 <image> tokens but 1 image").
    mixed = [user({"type": "image"}, text("What is <image>?"))]
    with pytest.raises(ValueError, match=r"the text of message 0 contains <image>, which is reserved: the "
                                         r"\{'type': 'image'\} items place the images; write the text without it"):
        ours.apply_chat_template(mixed)
    with pytest.raises(ValueError, match="the text of message 1 contains <image>"):  # in another message too
        ours.apply_chat_template([user({"type": "image"}, text("hi")), user(text("<image> and this?"))])
    # Without image items, text may place the image itself, as LLaVA's question files do.
    assert ours.apply_chat_template([user(text("<image>\nWhat?"))]) == "###Human: <image>\nWhat?"


def test_checkpoint_file_errors(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": "broken"')
    with pytest.raises(ValueError, match="tokenizer.json does not load as a tokenizer.*download it again"):
        VipLlavaProcessor.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        VipLlavaProcessor.from_pretrained(tmp_path)
    other = tmp_path / "other"
    write_checkpoint(other, image_token_index=7)
    with pytest.raises(ValueError, match="image_token_index 7 but tokenizer.json has <image> = "):
        VipLlavaProcessor.from_pretrained(other)
    shutil.rmtree(other)
    write_checkpoint(other)
    (other / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json is not valid JSON"):
        VipLlavaProcessor.from_pretrained(other)


def test_image_mode_error(tmp_path):
    write_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="image_mode must be 'pad'.*got 'letterbox'"):
        VipLlavaProcessor.from_pretrained(tmp_path, image_mode="letterbox")


def test_return_tensors_error(ours):
    with pytest.raises(ValueError, match="only 'pt'"):
        ours("Hi", return_tensors="np")


# ---------------------------------------------------------------------------- large images, tensors
def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: a decompression bomb's header, without its data."""
    import struct
    import zlib

    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="PNG")
    raw = bytearray(out.getvalue())
    ihdr = b"IHDR" + struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[12:29], raw[29:33] = ihdr, struct.pack(">I", zlib.crc32(ihdr))
    return bytes(raw)


@pytest.mark.parametrize("w,h,pixels", [(13000, 12000, "13000x12000 = 156,000,000"),  # over ours, under Pillow's
                                        (20000, 20000, "400,000,000")])  # over Pillow's limit too: it refuses first
def test_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, w, h, pixels):
    (tmp_path / "huge.png").write_bytes(png_claiming(w, h))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(ValueError, match=rf"huge.png is {pixels} pixels, more than the limit of 150,000,000 "
                                             rf"\(processor.MAX_IMAGE_PIXELS\): downscale it first"):
            load_image(tmp_path / "huge.png")


def test_large_image_is_reduced_for_the_model_after_the_marks_are_drawn():
    big = Image.new("RGB", (9000, 600), (30, 90, 30))  # long side over MAX_SIDE = 4096: reduced 3x
    marked = draw_visual_prompt(big, "box", [3000, 150, 6000, 450], width=12)  # coordinates in full-size pixels
    small = P.downscale(marked)
    assert small.size == (3000, 200)
    red = np.argwhere((np.asarray(small) == [255, 0, 0]).all(-1))  # (y, x) of pure red pixels
    assert np.abs(red.min(0) - [50, 1000]).max() <= 2 and np.abs(red.max(0) - [150, 2000]).max() <= 2
    assert torch.equal(preprocess(marked), preprocess(small))  # the processor does the same reduction
    photo_size = photo("chelsea.png")
    assert P.downscale(photo_size) is photo_size  # small images are untouched: transformers' numbers stay exact


def test_a_108_megapixel_file_loads_without_a_pillow_warning(tmp_path):
    Image.new("RGB", (12000, 9000), (200, 40, 40)).save(tmp_path / "phone.png", compress_level=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(tmp_path / "phone.png")
    assert image.size == (12000, 9000)  # full size: marks are drawn in its pixels
    assert preprocess(image).shape == (3, 336, 336)


@pytest.mark.parametrize("name", ["chelsea.png", "horse.png", "camera.png"])  # RGB, RGBA, L
def test_torch_tensors_give_the_same_pixels_as_numpy(name):
    array = np.asarray(photo(name))
    chw = torch.from_numpy((array if array.ndim == 3 else array[..., None]).copy()).permute(2, 0, 1)  # (C, H, W) uint8
    for tensor in (chw, chw / 255):  # uint8 0..255, and float 0..1 as torchvision's ToTensor gives
        image = load_image(tensor)
        assert image.mode == photo(name).mode and np.array_equal(np.asarray(image), array)
        assert torch.equal(preprocess(tensor), preprocess(array))


def test_torch_tensor_errors():
    with pytest.raises(ValueError, match=r"shape \(C, H, W\) with C = 1, 3 or 4, got \(30, 40, 3\).*permute"):
        load_image(torch.zeros(30, 40, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got \(1, 3, 30, 40\).*one image at a time"):
        load_image(torch.zeros(1, 3, 30, 40))
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*got 0\.\.255.*to\(torch.uint8\)"):
        load_image(torch.full((3, 4, 4), 255.0).index_fill_(1, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*got nan"):
        load_image(torch.full((3, 4, 4), float("nan")))
    with pytest.raises(TypeError, match="uint8 \\(0..255\\) or float \\(0..1\\), got torch.int64"):
        load_image(torch.zeros(3, 4, 4, dtype=torch.long))


def test_image_processor_is_the_processors_and_matches_clip_image_processor(tmp_path):
    from transformers import CLIPImageProcessor

    write_checkpoint(tmp_path, image_size=336)
    processor, reference = VipLlavaProcessor.from_pretrained(tmp_path), CLIPImageProcessor.from_pretrained(tmp_path)
    images = [photo("coffee.png"), photo("horse.png")]
    ours = processor.image_processor(images)["pixel_values"]  # (2, 3, 336, 336), padded as in training
    assert torch.equal(ours, processor("<image><image>", images)["pixel_values"])
    crop = processor.image_processor(images, image_mode="crop")["pixel_values"]
    assert (crop - reference(images=images, return_tensors="pt")["pixel_values"]).abs().max() <= PIXEL_TOL
    for name in ("size", "crop_size", "image_mean", "image_std", "resample", "rescale_factor"):
        assert getattr(processor.image_processor, name) == pytest.approx(getattr(reference, name)), name
    processor.image_mode = "crop"  # one setting: the processor's is the image processor's
    assert torch.equal(processor.image_processor.preprocess(images)["pixel_values"], crop)
    with pytest.raises(ValueError, match="no images"):
        processor.image_processor([])
