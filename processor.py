"""From what a user has (image files, a question, a chat) to `input_ids`, `attention_mask`, `pixel_values`,
and from generated ids back to text. Same names as transformers' `LlavaProcessor`; no transformers inside.

Quirks worth knowing:
- Images: EXIF orientation first, then RGB as transformers does it (transparency composited onto white),
  then the CLIP ViT-L/14-336 steps. `image_mode="pad"` (default) first pastes the image centred on a square
  of the mean colour, as ViP-LLaVA was trained; `"crop"` is transformers' centre crop, which cuts off
  whatever lies near the long edges of a non-square photo (markers included). A file over MAX_IMAGE_PIXELS
  is refused before decoding; a side over MAX_SIDE is reduced after the visual prompts are drawn.
- Text: the checkpoint's tokenizer.json as it is. Its legacy Llama normalizer gives every text segment a
  leading "▁", so text right after `<image>` starts with token "▁" (29871 in the real vocabulary).
  Each `<image>` is expanded to `image_seq_length` (576) copies before tokenizing, as transformers does.
- Chat: the hub's Jinja template ("vipllava", `###Human: ... ###Assistant:`) written out in Python, and
  the original training format ("llava_v1", `USER: ... ASSISTANT: ...</s>`).
"""
from __future__ import annotations

import io
import json
import math
import re
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import Tokenizer

import weights

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>", IMAGE_TOKEN)  # what skip_special_tokens drops
SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# The hub's chat template (chat_template.json of llava-hf/vip-llava-{7b,13b}-hf), verbatim; render_chat
# reproduces it, so it is only used to recognise it in a checkpoint.
VIPLLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '###Human: '}}"
    "{% elif message['role'] == 'assistant' %}{{ '###' + message['role'].title() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ '###Assistant:' }}{% endif %}"
)


# ---------------------------------------------------------------------------- images
# load_image refuses an image file or URL over this many pixels before decoding it (a small file can
# decode to gigabytes). 150 MP lets a 108 MP phone photo (12000x9000) through and sits below Pillow's own
# refusal at 2 x Image.MAX_IMAGE_PIXELS = 179 MP; server.py's stricter 50 MP default guards the network.
MAX_IMAGE_PIXELS = 150_000_000
# preprocess first reduces an image whose long side is over this by an integer factor (a fast box filter):
# the model sees 336 px anyway, and padding 12000x9000 to a square alone would take 432 MB.
MAX_SIDE = 4096


@dataclass(frozen=True)
class ImageConfig:
    shortest_edge: int = 336
    crop_size: tuple = (336, 336)  # (H, W)
    resample: int = 3  # PIL bicubic
    rescale_factor: float = 1 / 255
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    @classmethod
    def from_dict(cls, d: dict) -> "ImageConfig":  # preprocessor_config.json
        size, crop = d.get("size", {"shortest_edge": 336}), d.get("crop_size", {"height": 336, "width": 336})
        size = {"shortest_edge": size} if isinstance(size, int) else size
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        if "shortest_edge" not in size:
            raise ValueError(f"preprocessor_config.json has size {size}: only {{'shortest_edge': N}} is supported")
        return cls(size["shortest_edge"], (crop["height"], crop["width"]), d.get("resample", 3),
                   d.get("rescale_factor", 1 / 255), tuple(d.get("image_mean", CLIP_MEAN)),
                   tuple(d.get("image_std", CLIP_STD)))


def fetch(url: str, timeout: float = 30) -> bytes:
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "vipllava"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
        raise OSError(f"could not fetch the image {url} ({getattr(e, 'reason', e)}): check the address and the "
                      f"network, or download the image and pass its path") from e


def from_tensor(image: torch.Tensor) -> np.ndarray:
    """A (C, H, W) torch image, uint8 0..255 or float 0..1 (torchvision's ToTensor), -> uint8 (H, W, C)."""
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"a torch image must have shape (C, H, W) with C = 1, 3 or 4, got {tuple(image.shape)}: "
                         f"for (H, W, C) pass image.permute(2, 0, 1); for a batch pass one image at a time")
    x = image.detach().cpu()
    if x.is_floating_point():
        lo, hi = (x.min().item(), x.max().item()) if x.numel() else (0.0, 0.0)
        if not (0 <= lo and hi <= 1):  # NaN fails too
            raise ValueError(f"a float torch image must hold values in [0, 1] (as ToTensor gives), got {lo:g}..{hi:g}: "
                             f"for 0..255 values pass image.round().to(torch.uint8)")
        x = (x.float() * 255).round().to(torch.uint8)  # exact for ToTensor's x / 255
    elif x.dtype != torch.uint8:
        raise TypeError(f"a torch image must be uint8 (0..255) or float (0..1), got {x.dtype}")
    return x.permute(1, 2, 0).numpy()  # (H, W, C)


def too_large(name: str, pixels: str) -> ValueError:
    return ValueError(f"{name} is {pixels} pixels, more than the limit of {MAX_IMAGE_PIXELS:,} "
                      f"(processor.MAX_IMAGE_PIXELS): downscale it first, e.g. to {MAX_SIDE} px on the long side")


def open_image(source, name: str) -> Image.Image:
    """Decode a file or URL's bytes, refusing an image over MAX_IMAGE_PIXELS before its pixels are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(source)  # reads the header only
        if image.width * image.height > MAX_IMAGE_PIXELS:
            image.close()
            raise too_large(name, f"{image.width}x{image.height} = {image.width * image.height:,}")
        image.load()  # decode now, so that a truncated file fails here and not halfway through a batch
    except Image.DecompressionBombError as e:  # over Pillow's own limit: it refuses before we see the size
        count = re.search(r"\((\d+) pixels\)", str(e))
        raise too_large(name, f"{int(count[1]):,}" if count else "too many") from None
    except UnidentifiedImageError as e:
        raise ValueError(f"{name} is not an image file Pillow can read (empty, or not PNG/JPEG/...)") from e
    except OSError as e:
        raise ValueError(f"{name} is truncated or damaged ({e}): download or save it again") from e
    return image


def load_image(image) -> Image.Image:
    """A PIL image, upright as a viewer shows it (EXIF orientation applied), in whatever mode it has, at full size
    (coordinates of visual prompts are in its pixels; `preprocess` reduces a large one after they are drawn).

    Accepts a path (str or Path), an http(s) URL, a PIL image, a uint8 numpy array (H, W), (H, W, 1),
    (H, W, 3) RGB or (H, W, 4) RGBA, or a torch tensor (C, H, W) with C = 1, 3 or 4, uint8 0..255 or float
    0..1. A file or URL over MAX_IMAGE_PIXELS is refused (ValueError) before it is decoded.
    """
    if isinstance(image, torch.Tensor):
        image = from_tensor(image)
    if isinstance(image, np.ndarray):
        channels = image.shape[2] if image.ndim == 3 else 1
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in (1, 3, 4):
            raise TypeError(f"a numpy image must be uint8 of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got "
                            f"{image.dtype} {image.shape}: for floats in [0, 1] pass "
                            f"(x * 255).round().astype(np.uint8)")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and channels == 1 else image)
    elif isinstance(image, (str, Path)):
        name = str(image)
        if name.startswith(("http://", "https://")):
            source = io.BytesIO(fetch(name))
        else:
            source = Path(name).expanduser()
            if source.is_dir():
                raise IsADirectoryError(f"{name} is a folder, not an image file: give the path of one image in it")
            if not source.is_file():
                raise FileNotFoundError(f"no image file {name}: check the path")
        image = open_image(source, name)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"cannot use a {type(image).__name__} as an image: pass a path, a URL, a PIL image, "
                        f"a numpy array or a torch tensor")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"the image has zero size ({image.width}x{image.height})")
    # A phone photo is often stored sideways with an EXIF "rotate" tag; apply it so that the model and
    # any box coordinates see what a viewer shows.
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers makes it: transparent pixels become white (alpha-composited onto white, not
    dropped - the original LLaVA code's plain .convert("RGB") keeps their hidden colour, often black).
    Other modes go through Pillow's convert: L, P and CMYK as expected; I;16 is clipped at 255, not scaled."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def expand_to_square(image: Image.Image, fill: tuple) -> Image.Image:
    """Paste centred on a square canvas, as ViP-LLaVA's `expand2square` (image_aspect_ratio "pad")."""
    w, h = image.size
    side = max(w, h)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def reduction(width: int, height: int) -> int:
    """The integer factor `downscale` divides the sides by: the smallest that brings the long side to MAX_SIDE."""
    return max(1, math.ceil(max(width, height) / MAX_SIDE))


def downscale(image: Image.Image) -> Image.Image:
    """`image` with its sides divided by `reduction` (rounded up; each new pixel the mean of a block), or
    `image` itself if it fits. Draw visual prompts before: their coordinates are in the full-size pixels."""
    factor = reduction(*image.size)
    return image.reduce(factor) if factor > 1 else image


def preprocess(image, mode: str = "pad", config: ImageConfig = ImageConfig()) -> torch.Tensor:
    """One image -> (3, H, W) float32: RGB, [pad to a square,] resize, centre crop, rescale, normalize.
    An image over MAX_SIDE px is first `downscale`d (so it differs slightly from transformers' numbers)."""
    if mode not in ("pad", "crop"):
        raise ValueError(f"image_mode must be 'pad' (ViP-LLaVA training) or 'crop' (transformers), got {mode!r}")
    image = downscale(to_rgb(load_image(image)))
    if mode == "pad":
        image = expand_to_square(image, tuple(int(m * 255) for m in config.image_mean))  # (122, 116, 104)
    # Shortest edge to `shortest_edge`, the long one floored, exactly as transformers computes it.
    w, h, s = *image.size, config.shortest_edge
    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    image = image.resize(size, resample=config.resample)
    ch, cw = config.crop_size
    left, top = (size[0] - cw) // 2, (size[1] - ch) // 2
    image = image.crop((left, top, left + cw, top + ch))  # outside the image: black, like transformers' zero pad
    # Same arithmetic as transformers: uint8 -> float64 * scale -> float32, then (x - mean) / std in float32.
    x = (np.asarray(image).astype(np.float64) * config.rescale_factor).astype(np.float32)  # (H, W, 3)
    x = (x - np.array(config.image_mean, np.float32)) / np.array(config.image_std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()  # (3, H, W)


class ImageProcessor:
    """`processor.image_processor`, as in transformers: images -> {"pixel_values": (N, 3, H, W)}, with the
    attribute names of CLIPImageProcessor. Its `image_mode` is the processor's: "pad" (ViP-LLaVA training)
    unless set; "crop" gives CLIPImageProcessor's numbers."""

    def __init__(self, config: ImageConfig = ImageConfig(), image_mode: str = "pad"):
        self.config, self.image_mode = config, image_mode
        self.size, self.resample = {"shortest_edge": config.shortest_edge}, config.resample
        self.crop_size = {"height": config.crop_size[0], "width": config.crop_size[1]}
        self.rescale_factor = config.rescale_factor
        self.image_mean, self.image_std = list(config.image_mean), list(config.image_std)

    def __call__(self, images, image_mode: str | None = None, return_tensors: str = "pt") -> dict:
        check_return_tensors(return_tensors)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("no images: pass one image or a list of them")
        mode = image_mode or self.image_mode
        return {"pixel_values": torch.stack([preprocess(x, mode, self.config) for x in images])}  # (N, 3, H, W)

    preprocess = __call__  # transformers' other name for it


# ---------------------------------------------------------------------------- chat templates
def message_parts(message, i: int) -> tuple[str, int, str]:
    """(role, number of images, text) of one message in the transformers format."""
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"message {i} has role {role!r}: use 'system', 'user' or 'assistant'")
    content = message.get("content")
    # A plain string is taken as one text item (the Jinja template would silently render nothing).
    content = [{"type": "text", "text": content}] if isinstance(content, str) else content
    def valid(c):
        if not isinstance(c, dict):
            return False
        return c.get("type") == "image" or c.get("type") == "text" and isinstance(c.get("text"), str)

    if not isinstance(content, list) or not all(valid(c) for c in content):
        raise ValueError(f"message {i} content must be a string or a list of {{'type': 'image'}} and "
                         f"{{'type': 'text', 'text': ...}} items, got {content!r}")
    n_images = sum(c["type"] == "image" for c in content)
    return role, n_images, "".join(c["text"] for c in content if c["type"] == "text")


def refuse_image_token(text: str, where: str, how: str):
    """A typed `<image>` where images are placed automatically would be one image slot too many: say so."""
    if IMAGE_TOKEN in text:
        raise ValueError(f"{where} contains {IMAGE_TOKEN}, which is reserved: {how}; write the text without it")


def render_chat(conversation: list, add_generation_prompt: bool = False, template: str = "vipllava") -> str:
    """The prompt string. In both formats a message's images come before its text, one "<image>\\n" each.
    Text may place an image itself by containing <image> (LLaVA's question files do), but not in a
    conversation that also has image items: that is refused, as it would be one image slot too many.

    "vipllava": the hub template. `###Human: ` before user turns, `###Assistant: ` before assistant turns,
    nothing before a system message, no separator after a turn.
    "llava_v1": the original ViP-LLaVA training format, `<system> USER: <q> ASSISTANT: <a></s>USER: ...`;
    the system text is the conversation's system message, else LLaVA's default `SYSTEM_PROMPT`.
    """
    if not conversation:
        raise ValueError("the conversation is empty: pass a list of messages like "
                         "[{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': '...'}]}]")
    parts = [message_parts(m, i) for i, m in enumerate(conversation)]
    if any(n for _, n, _ in parts):  # images as items: a typed <image> (LLaVA's own way) would be one too many
        for i, (_, _, text) in enumerate(parts):
            refuse_image_token(text, f"the text of message {i}", "the {'type': 'image'} items place the images")
    if template == "vipllava":
        prefix = {"user": "###Human: ", "assistant": "###Assistant: ", "system": ""}
        prompt = "".join(prefix[role] + "<image>\n" * n + text for role, n, text in parts)
        return prompt + ("###Assistant:" if add_generation_prompt else "")
    if template == "llava_v1":
        system = next((("<image>\n" * n + text) for role, n, text in parts if role == "system"), SYSTEM_PROMPT)
        turn = {"user": "USER: {} ", "assistant": "ASSISTANT: {}</s>"}  # separators " " and "</s>"
        turns = "".join(turn[role].format("<image>\n" * n + text) for role, n, text in parts if role != "system")
        return system + " " + turns + ("ASSISTANT:" if add_generation_prompt else "")
    raise ValueError(f"unknown chat template {template!r}: use 'vipllava' (the hub's) or 'llava_v1' "
                     f"(original training)")


# ---------------------------------------------------------------------------- the processor
def check_return_tensors(return_tensors):
    if return_tensors != "pt":
        raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' (torch tensors) is supported")


def pad(rows: list[list[int]], pad_id: int, side: str = "left", padding=True) -> tuple:
    """(input_ids, attention_mask), each (B, T): the rows padded to the longest on `side`. Left by default, so
    that every row's next token is generated at the same, last, position. `padding` is transformers' argument:
    True/"longest"/False are accepted (a batch is always padded to its longest row)."""
    if padding not in (True, False, "longest", "do_not_pad") or side not in ("left", "right"):
        raise ValueError(f"padding={padding!r} on the {side!r}: only padding to the longest row (padding=True) is "
                         f"supported, on the 'left' (for generate) or the 'right'")
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        at = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        input_ids[b, at], attention_mask[b, at] = torch.tensor(r, dtype=torch.long), 1
    return input_ids, attention_mask


class TextTokenizer:
    """`processor.tokenizer`: the checkpoint's `tokenizers.Tokenizer` (its `backend_tokenizer`, as transformers
    names it) with transformers' tokenizer calls; other attributes (token_to_id, get_vocab, ...) are the backend's."""

    def __init__(self, backend: Tokenizer, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>",
                 padding_side: str = "left"):
        self.backend_tokenizer, self.padding_side = backend, padding_side
        self.pad_token, self.eos_token, self.bos_token, self.unk_token = pad_token, eos_token, bos_token, unk_token
        self.pad_token_id, self.eos_token_id, self.bos_token_id, self.unk_token_id = (
            backend.token_to_id(t) for t in (pad_token, eos_token, bos_token, unk_token))
        self.special_ids = {backend.token_to_id(t) for t in SPECIAL_TOKENS} - {None}  # what skip_special_tokens drops

    def __getattr__(self, name):  # token_to_id, id_to_token, get_vocab_size...: the tokenizers.Tokenizer's own
        if name == "backend_tokenizer":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.backend_tokenizer, name)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text, add_special_tokens: bool = True, padding=False, return_tensors=None) -> dict:
        """{"input_ids", "attention_mask"}: lists (one row for a string), or (B, T) tensors padded on
        `padding_side` with return_tensors="pt"."""
        rows = [self.encode(t, add_special_tokens) for t in ([text] if isinstance(text, str) else text)]
        if return_tensors is None and not padding:
            out = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        else:
            input_ids, attention_mask = pad(rows, self.pad_token_id, self.padding_side, padding)
            if return_tensors is not None:
                check_return_tensors(return_tensors)
                return {"input_ids": input_ids, "attention_mask": attention_mask}
            out = {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist()}
        return {k: v[0] for k, v in out.items()} if isinstance(text, str) else out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        # The tokenizer.json decoder applies the Llama rules: "▁" -> " ", bytes fused into UTF-8 characters,
        # and one leading space dropped from the start of the text.
        return self.backend_tokenizer.decode(ids, skip_special_tokens=False)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]


class VipLlavaProcessor:
    def __init__(self, tokenizer: Tokenizer | TextTokenizer, image_config: ImageConfig = ImageConfig(),
                 image_seq_length: int = 576, context_length: int = 2048, image_mode: str = "pad",
                 pad_token: str = "<pad>", chat_template: str | None = None):
        if image_mode not in ("pad", "crop"):
            raise ValueError(f"image_mode must be 'pad' (ViP-LLaVA training) or 'crop' (transformers), "
                             f"got {image_mode!r}")
        tokenizer = tokenizer if isinstance(tokenizer, TextTokenizer) else TextTokenizer(tokenizer, pad_token)
        self.tokenizer, self.image_config = tokenizer, image_config
        self.image_processor = ImageProcessor(image_config, image_mode)
        self.image_seq_length, self.context_length, self.chat_template = image_seq_length, context_length, chat_template
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if self.image_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} or {tokenizer.pad_token!r} token: use the "
                             f"tokenizer.json of a VipLlava checkpoint (llava-hf/vip-llava-7b-hf)")
        self.special_ids = tokenizer.special_ids
        self.byte_ids = {i for t, i in tokenizer.get_vocab().items() if re.fullmatch(r"<0x[0-9A-F]{2}>", t)}

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, path_or_repo_id, image_mode: str = "pad") -> "VipLlavaProcessor":
        folder = weights.resolve(path_or_repo_id, allow_patterns=weights.CONFIG_FILES)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}: the processor needs the checkpoint's tokenizer")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:
            raise ValueError(f"{file} does not load as a tokenizer ({str(e).splitlines()[0] if str(e) else e!r}): "
                             f"download it again") from e
        config = weights.read_config(folder) if (folder / "config.json").is_file() else {}
        tokenizer_config = weights.read_json(folder / "tokenizer_config.json")
        processor_config = weights.read_json(folder / "processor_config.json")
        special_tokens = weights.read_json(folder / "special_tokens_map.json")
        def token(name, default):  # as transformers reads them: the special tokens map, then tokenizer_config.json
            t = special_tokens.get(name) or tokenizer_config.get(name) or default
            return t["content"] if isinstance(t, dict) else t

        tokenizer = TextTokenizer(tokenizer, token("pad_token", "<pad>"), token("eos_token", "</s>"),
                                  token("bos_token", "<s>"), token("unk_token", "<unk>"))
        image_config = ImageConfig.from_dict(weights.read_json(folder / "preprocessor_config.json"))
        # The real config.json has no image_seq_length: the vision tower gives (336 / 14)**2 = 576 positions.
        patch = processor_config.get("patch_size") or config.get("vision_config", {}).get("patch_size", 14)
        h, w = image_config.crop_size
        seq = config.get("image_seq_length") or (h // patch) * (w // patch)
        context = config.get("text_config", {}).get("max_position_embeddings")
        if context is None:  # save_pretrained writes it as model_max_length; transformers' "no limit" is 1e30
            limit = tokenizer_config.get("model_max_length", 2048)
            context = limit if limit < 10**9 else 2048  # the Llama default
        template = (weights.read_json(folder / "chat_template.json").get("chat_template")
                    or tokenizer_config.get("chat_template") or processor_config.get("chat_template"))
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        processor = cls(tokenizer, image_config, seq, context, image_mode, chat_template=template)
        if config.get("image_token_index", processor.image_token_id) != processor.image_token_id:
            raise ValueError(f"config.json says image_token_index {config['image_token_index']} but tokenizer.json has "
                             f"{IMAGE_TOKEN} = {processor.image_token_id}: the files come from different checkpoints")
        return processor

    def images_per_text(self, texts: list[str], images) -> list[list]:
        """Split `images` (None, one image, a flat list in text order, or a list per text) by text."""
        counts = [t.count(IMAGE_TOKEN) for t in texts]
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        if images and all(isinstance(x, (list, tuple)) for x in images):
            if len(images) != len(texts):
                raise ValueError(f"{len(images)} lists of images for {len(texts)} texts: give one list per text")
            for i, (n, imgs) in enumerate(zip(counts, images)):
                if n != len(imgs):
                    raise ValueError(f"text {i} has {n} {IMAGE_TOKEN} token(s) but {len(imgs)} image(s) were given "
                                     f"for it: put one {IMAGE_TOKEN} in the text per image")
            return [list(x) for x in images]
        if sum(counts) != len(images):
            raise ValueError(f"the text has {sum(counts)} {IMAGE_TOKEN} token(s) but {len(images)} image(s) were "
                             f"given: put one {IMAGE_TOKEN} in the text per image, in order")
        ends = np.cumsum([0] + counts)
        return [images[a:b] for a, b in zip(ends[:-1], ends[1:])]

    def __call__(self, text, images=None, image_mode: str | None = None, return_tensors: str = "pt",
                 padding=True) -> dict:
        """{"input_ids", "attention_mask"} (B, T), padded on tokenizer.padding_side ("left": for generate), and
        "pixel_values" (N, 3, H, W) when there are images. `padding` is accepted as transformers users pass it."""
        check_return_tensors(return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no text: pass a prompt string or a list of them")
        per_text = self.images_per_text(texts, images)
        rows = []
        for i, t in enumerate(texts):
            # As transformers does: expand in the string, then tokenize (the post-processor adds <s>).
            ids = self.encode(t)
            if len(ids) > self.context_length:
                raise ValueError(f"prompt {i} is {len(ids)} tokens long once each {IMAGE_TOKEN} is expanded to "
                                 f"{self.image_seq_length}, more than the model's context of {self.context_length}: "
                                 f"shorten the text or use fewer images")
            rows.append(ids)
        input_ids, attention_mask = pad(rows, self.pad_token_id, self.tokenizer.padding_side, padding)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        flat = [image for imgs in per_text for image in imgs]
        if flat:  # no key at all for text-only input, as in transformers
            out["pixel_values"] = self.image_processor(flat, image_mode)["pixel_values"]  # (N, 3, H, W)
        return out

    @property
    def image_mode(self) -> str:  # one setting, kept by the image processor
        return self.image_processor.image_mode

    @image_mode.setter
    def image_mode(self, mode: str):
        self.image_processor.image_mode = mode

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, as __call__ makes them: each <image> expanded, then tokenized (with <s>)."""
        return self.tokenizer.encode(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.image_seq_length))

    def apply_chat_template(self, conversation: list, add_generation_prompt: bool = False, template: str | None = None,
                            tokenize: bool = False, return_dict: bool = False, images=None, return_tensors="pt"):
        """The prompt for `conversation` (transformers' message format); see `render_chat` for the templates.
        tokenize=True, as transformers: the processor's output for it (input_ids alone unless return_dict), with
        the images given here or in the image items ({"type": "image", "image"/"url"/"path": ...})."""
        if template is None:
            if self.chat_template not in (None, VIPLLAVA_CHAT_TEMPLATE):
                raise ValueError("this checkpoint's chat template is not the ViP-LLaVA one reproduced here: choose a "
                                 "format with template='vipllava' (hub) or template='llava_v1' (original training)")
            template = "vipllava"
        prompt = render_chat(conversation, add_generation_prompt, template)
        if not tokenize:
            return prompt
        items = [c for m in conversation if isinstance(m.get("content"), list) for c in m["content"]]
        if images is None:
            images = [c[k] for c in items if c.get("type") == "image" for k in ("image", "url", "path") if k in c]
        out = self(prompt, images=images or None, return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens)

    def save_pretrained(self, folder) -> Path:
        """Write the files from_pretrained (ours or transformers' LlavaProcessor) reads: tokenizer, image processor,
        processor config, chat template. image_mode is a loading choice, not saved."""
        folder, t, c = Path(folder), self.tokenizer, self.image_config
        folder.mkdir(parents=True, exist_ok=True)
        t.backend_tokenizer.save(str(folder / "tokenizer.json"))
        h, w = c.crop_size
        patch = h // math.isqrt(self.image_seq_length)  # (h / patch) * (w / patch) positions per image
        files = {
            "tokenizer_config.json": {
                "tokenizer_class": "PreTrainedTokenizerFast", "processor_class": "LlavaProcessor",
                "bos_token": t.bos_token, "eos_token": t.eos_token, "unk_token": t.unk_token, "pad_token": t.pad_token,
                "padding_side": t.padding_side, "model_max_length": self.context_length,
                "clean_up_tokenization_spaces": False},
            "preprocessor_config.json": {
                "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
                "do_resize": True, "size": {"shortest_edge": c.shortest_edge}, "resample": c.resample,
                "do_center_crop": True, "crop_size": {"height": h, "width": w}, "do_rescale": True,
                "rescale_factor": c.rescale_factor, "do_normalize": True, "image_mean": list(c.image_mean),
                "image_std": list(c.image_std), "do_convert_rgb": True},
            "processor_config.json": {
                "processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": patch,
                "num_additional_image_tokens": 1, "vision_feature_select_strategy": "default"},
            "chat_template.json": {"chat_template": self.chat_template or VIPLLAVA_CHAT_TEMPLATE},
        }
        if (h // patch) * (w // patch) != self.image_seq_length:
            raise ValueError(f"{self.image_seq_length} positions per image do not tile a {h}x{w} image with square "
                             f"patches: transformers' LlavaProcessor could not read this processor back")
        for name, obj in files.items():
            (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        return folder

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Feed generated ids one at a time; `push` returns the text that became final (often ""), `flush`
    the rest at the end (call it: a last newline byte is held until then). The pieces joined equal
    `decode` of all the ids.

    A run of byte-fallback tokens (<0xE7> <0x8C> <0xAB> = "猫") is decoded as a whole - and as one U+FFFD
    per byte if the run is not valid UTF-8 - so its text is final only once a token that is not a byte
    ends the run. Each step then decodes a short window from the last emitted boundary, without and with
    the new ids, and emits the difference; the window keeps the leading-space rules right.
    """

    def __init__(self, processor: VipLlavaProcessor, skip_special_tokens: bool = True):
        self.processor, self.skip = processor, skip_special_tokens
        self.ids, self.prefix, self.read = [], 0, 0  # window start, end of the emitted part

    def step(self) -> str:
        before = self.processor.decode(self.ids[self.prefix:self.read])
        after = self.processor.decode(self.ids[self.prefix:])
        if len(after) <= len(before):  # e.g. a lone "▁" at the start of the text: nothing to show yet
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def push(self, token_id) -> str:
        token_id = int(token_id)
        if self.skip and token_id in self.processor.special_ids:
            return ""
        self.ids.append(token_id)
        return "" if token_id in self.processor.byte_ids else self.step()

    def flush(self) -> str:
        return self.step()


def __getattr__(name):  # `from processor import draw_visual_prompt` as before the move to visual_prompts.py (imported
    import visual_prompts  # here, not at the top, since visual_prompts imports this module: one way, no circle)

    if name not in visual_prompts.__all__:
        raise AttributeError(f"module 'processor' has no attribute {name!r}")
    return getattr(visual_prompts, name)
