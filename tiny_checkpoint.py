"""Write small random VipLlava checkpoints in the official hub format, for tests, notebooks and benchmarks.

`write_processor_files` writes everything but the model: a Llama-style tokenizer (SentencePiece BPE with
byte fallback, `<unk>`=0 `<s>`=1 `</s>`=2, the 256 byte pieces, then a few hundred pieces trained here on a
small built-in corpus, then `<image>` and `<pad>`), the CLIP preprocessor config, the processor config,
the chat template and the generation config - the same files, in the same form, as llava-hf/vip-llava-7b-hf.
`python tiny_checkpoint.py FOLDER` writes a TINY one, to try the command line offline (--help for options).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from processor import CLIP_MEAN, CLIP_STD, VIPLLAVA_CHAT_TEMPLATE
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Chat-like English with a few accents and CJK characters, so pieces look like a real vocabulary's;
# characters that are not here (most emoji, most CJK) fall back to byte pieces, as in Llama.
CORPUS = """\
A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is shown in this image? ASSISTANT: The image shows a red stop sign on a street corner.
USER: Describe the image in more details. ASSISTANT: There is a cat sitting on a green sofa next to a ball.
What is the color of the object inside the red rectangle? The object within the red box is a cup of coffee.
What is the animal pointed to by the arrow? The arrow points to a brown horse standing in a field.
Can you please describe this image? The image features a brown and white cat sitting on a table.
The astronaut is wearing an orange suit and holding a helmet, with a flag in the background.
A man with a camera stands on the grass in front of a building, under a clear blue sky.
How many people are there in the picture? There are two people walking along the beach at sunset.
Is the dog to the left or to the right of the tree? The dog is to the left of the tree, near the fence.
The café on the corner serves crème brûlée, croissants and a naïve but delicious piña colada.
Über die Brücke gehen die Leute zur Straße; the façade of the old théâtre is beautiful.
猫が座っています。这是一只猫。图片里有一个人和一只狗。
The quick brown fox jumps over the lazy dog. Numbers like 1, 2, 3, 10, 42 and 2024 appear too.
Questions and answers: yes, no, maybe; left, right, top, bottom, center, middle, corner, edge.
"""


def train_tokenizer(n_pieces: int = 320, legacy: bool = True) -> Tokenizer:
    """A Llama-2-style tokenizer: <unk> <s> </s>, 256 byte pieces, then `n_pieces` trained BPE pieces."""
    # Train on words split at "▁" (SentencePiece never merges across words), then rebuild the model
    # with Llama's id layout and pipeline.
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=n_pieces, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if legacy:  # the form of the llava-hf tokenizer.json: every text segment gets a leading "▁"
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:  # the newer form (transformers' LlamaConverter with legacy=False): only the start of the text
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<image>", "<pad>")])
    return tok


def write_processor_files(folder, image_size=336, patch_size=14, legacy=True, max_position_embeddings=None) -> dict:
    """Write the tokenizer, preprocessor, processor, chat-template and generation files (not config.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(legacy=legacy)
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")}

    def spec(t):
        return {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    def write(name, obj):
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    write("tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "legacy": legacy,
        "added_tokens_decoder": {str(i): spec(t) | {"special": True} for t, i in ids.items()},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "clean_up_tokenization_spaces": False, "padding_side": "left", "processor_class": "LlavaProcessor",
        "model_max_length": max_position_embeddings or 1000000000000000019884624838656,
        "tokenizer_class": "LlamaTokenizer",
    })
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    write("special_tokens_map.json", {k: spec(t) for k, t in names.items()})
    write("added_tokens.json", {"<image>": ids["<image>"], "<pad>": ids["<pad>"]})
    write("chat_template.json", {"chat_template": VIPLLAVA_CHAT_TEMPLATE})
    write("preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
        "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
    })
    write("processor_config.json", {"processor_class": "LlavaProcessor", "image_token": "<image>",
                                    "patch_size": patch_size, "num_additional_image_tokens": 1,
                                    "vision_feature_select_strategy": "default"})
    write("generation_config.json", {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"],
                                     "pad_token_id": ids["<pad>"]})
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "image_token_index": ids["<image>"],
            "pad_token_id": ids["<pad>"], "image_seq_length": (image_size // patch_size) ** 2}


# ---------------------------------------------------------------------------- the model
# The real checkpoint's shapes (llava-hf/vip-llava-7b-hf); TINY runs anywhere in seconds.
VISION_7B = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14)
TEXT_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064)
# 11 CLIP layers: the five feature layers [-2, -5, -8, -11, 6] are all distinct. Real 336 px images, 576 tokens.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=11, num_attention_heads=2,
                   image_size=336, patch_size=14)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5)


def write_checkpoint(folder, text: dict | None = None, vision: dict | None = None, dtype="float16", seed: int = 0,
                     max_shard_bytes: int = 2 * 2**30, device="cpu") -> Path:
    """A random VipLlava in the hub format: config.json, safetensors shards + index, processor files.

    `text`/`vision` override the TINY shapes (e.g. `text=TEXT_7B | dict(num_hidden_layers=2)`); `device="cuda"`
    draws the weights on a GPU (seconds instead of minutes for the 7B; other numbers than on the CPU).
    Weights are random: answers are gibberish, every shape and code path is the real one.
    """
    import torch

    import weights
    from vipllava import VipLlava, VipLlavaConfig

    folder = Path(folder)
    text, vision = {**TINY_TEXT, **(text or {})}, {**TINY_VISION, **(vision or {})}
    info = write_processor_files(folder, vision["image_size"], vision["patch_size"], legacy=True,
                                 max_position_embeddings=text["max_position_embeddings"])
    text["vocab_size"] = max(text.get("vocab_size", 0), -(-info["vocab_size"] // 64) * 64)  # padded like the real one
    config = {  # the 13B checkpoint's style: explicit vision_feature_layers, diff-style sub-configs
        "architectures": ["VipLlavaForConditionalGeneration"], "model_type": "vipllava",
        "image_token_index": info["image_token_index"], "pad_token_id": info["pad_token_id"],
        "image_seq_length": info["image_seq_length"], "projector_hidden_act": "gelu", "projector_layernorm_eps": 1e-5,
        "vision_feature_layers": [-2, -5, -8, -11, 6], "torch_dtype": dtype, "transformers_version": "4.36.0.dev0",
        "text_config": {"model_type": "llama", **text}, "vision_config": {"model_type": "clip_vision_model", **vision},
        "vocab_size": text["vocab_size"],
    }
    torch.manual_seed(seed)
    with torch.device(device):
        model = VipLlava(VipLlavaConfig.from_dict(config))  # PyTorch's default init: lively enough to vary
    state = {k: v.to(weights.DTYPES[dtype]).cpu() for k, v in model.state_dict().items()}
    weights.save_weights(state, folder, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------- the command line
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, as vipllava.py's errors
        print(f"tiny_checkpoint.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def is_checkpoint(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "vipllava"
    except (OSError, ValueError, AttributeError):
        return False


MADE_WITH = "tiny_checkpoint.json"  # the settings this command wrote a folder with: a rerun finds it done


def check_folder(folder: Path, settings: dict, force: bool, p: Parser) -> bool:
    """Write only into a new or empty folder, or with --force over a VipLlava checkpoint: never over other files.
    False: the folder already holds what this command would write (the same settings), nothing to do."""
    if folder.exists() and not folder.is_dir():
        p.error(f"{folder} is a file: give a folder to write the checkpoint into")
    if not folder.is_dir() or not any(folder.iterdir()):
        return True
    if not is_checkpoint(folder):
        p.error(f"{folder} is not empty and holds no VipLlava checkpoint: choose a new or empty folder")
    if not force:
        try:
            if json.loads((folder / MADE_WITH).read_text()) == settings:
                return False
        except (OSError, ValueError):
            pass
        p.error(f"{folder} already holds a VipLlava checkpoint (not this command's with these settings): use it as "
                f"it is, or pass --force to replace it")
    for old in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a sharded checkpoint's index would otherwise point at its old shards
    return True


def main(argv=None):
    p = Parser(prog="tiny_checkpoint.py", description="Write a small random VipLlava checkpoint in the hub format "
               "(about 1 MB), to try the command line, the server and the notebooks offline: "
               "python vipllava.py --model FOLDER --image ... --prompt .... Its weights are random: answers are gibberish.")
    p.add_argument("folder", metavar="FOLDER", help="where to write it: a new or empty folder (or one this command "
                   "wrote with the same settings: then nothing is done)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="of the weights (default float32: runs on every CPU)")
    p.add_argument("--seed", type=int, default=0, help="of the random weights (default 0)")
    p.add_argument("--force", action="store_true", help="replace the checkpoint a folder already holds "
                   "(a folder with other files is never written into)")
    args = p.parse_args(argv)
    folder, settings = Path(args.folder).expanduser(), {"dtype": args.dtype, "seed": args.seed}
    if check_folder(folder, settings, args.force, p):
        write_checkpoint(folder, dtype=args.dtype, seed=args.seed)
        (folder / MADE_WITH).write_text(json.dumps(settings) + "\n")
        done = "wrote a random VipLlava checkpoint"
    else:
        done = "already there, nothing written: a random VipLlava checkpoint"
    print(f"{done} ({args.dtype}, seed {args.seed}) in {folder}: its answers are "
          f"gibberish; try python vipllava.py --model {folder} --image tests/images/chelsea.png --prompt ...",
          file=sys.stderr)
    print(folder)  # on stdout, for scripts


if __name__ == "__main__":  # python tiny_checkpoint.py FOLDER: a checkpoint to try the command line on, offline
    main()
