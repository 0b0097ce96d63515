"""The command line: `python vipllava.py --image photo.jpg --box 40,60,220,300 --prompt "What is in the box?"`.

Parses the flags, draws the visual prompts on the image, loads the processor and the model, and
streams the answer to stdout (status and errors to stderr; a user error exits 2 with one line).
`vipllava.py` delegates its `__main__` here, so the model file stays the model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import weights
from generate import ChatSession, check_sampling
from processor import refuse_image_token
from vipllava import VipLlava
from weights import log

SHAPE_FLAGS = ["box", "ellipse", "triangle", "point", "arrow", "scribble", "mask", "mask-contour"]


class Shape(argparse.Action):
    """--box etc.: remember each marker in order, with the --color in force when it was given."""

    def __call__(self, parser, ns, values, option_string=None):
        ns.marks = (ns.marks or []) + [(self.dest.replace("_", "-"), values, ns.color)]


def fail(message: str):
    """A user error: one line on stderr, exit status 2, no traceback."""
    log(f"vipllava.py: error: {message}")
    sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none (None, False) or its help already says it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


def negative_coordinates(argv: list[str]) -> list[str]:
    """`--box -5,75,100,155`: argparse takes a value starting with '-' for a flag; join it as `--box=-5,...`."""
    out = []
    for arg in argv:
        if out and out[-1].lstrip("-") in SHAPE_FLAGS and len(arg) > 1 and arg[0] == "-" and (arg[1].isdigit() or arg[1] == "."):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def line_width(text: str) -> float:
    width = float(text)
    if not width >= 1:  # 0 or less would draw a 1-pixel line, not what was asked
        raise argparse.ArgumentTypeError(f"must be at least 1 pixel, got {text}")
    return width


def parse_args(argv=None):
    p = Parser(prog="vipllava.py", description="Ask ViP-LLaVA about an image, optionally marked with a box, "
               "arrow, scribble... The answer streams to stdout; status goes to stderr.",
               formatter_class=HelpFormatter)
    p.add_argument("--image", help="image file or URL")
    p.add_argument("--prompt", help="the question (required without --chat; with --chat the first question, "
                   "or leave it out and type every question on stdin)")
    p.add_argument("--model", default="llava-hf/vip-llava-7b-hf", help="hub id or local checkpoint folder")
    p.add_argument("--adapter", help="a LoRA adapter folder (finetune.py's output, PEFT's format), merged into --model "
                   "(kept apart over --quantize: merging re-quantizes)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the most tokens an answer may have")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the most likely tokens reaching this probability (1: off)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (0: off; default: "
                   "the checkpoint's generation_config.json, else 50 as in transformers)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: on a CPU float32 if it fits in memory with room to spare, else bfloat16; the "
                        "checkpoint's float16 on GPUs; bfloat16 with --quantize")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantize the language model's weights while loading: int8 needs about half the memory of "
                        "bfloat16 (7.6 GB for the 7B), int4 a third (4.5 GB)")
    p.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128, 256],
                   help="inputs per int4 scale and zero point: smaller is more accurate and larger on disk "
                        "(default 128, or the largest that divides a small model's layer widths)")
    p.add_argument("--image-mode", default="pad", choices=["pad", "crop"],
                   help="pad: pad to a square, as the model was trained; crop: transformers' centre crop")
    p.add_argument("--template", default="vipllava", choices=["vipllava", "llava_v1"],
                   help="vipllava: the hub chat template (###Human/###Assistant); llava_v1: the original training format")
    p.add_argument("--system", default=None, help="system line (default: the one the model was trained with)")
    p.add_argument("--chat", action="store_true", help="keep talking about the image; an empty line or Ctrl-D ends")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA: much faster "
                   "tokens/s after a minute of compiling)")
    p.add_argument("--verbose", action="store_true", help="timings on stderr")
    g = p.add_argument_group("visual prompts (each flag may be repeated; coordinates in pixels of the image)")
    for flag, form in zip(SHAPE_FLAGS, ["x1,y1,x2,y2", "x1,y1,x2,y2", "x1,y1,x2,y2,x3,y3", "x,y", "x1,y1,x2,y2",
                                        "x1,y1,x2,y2,...", "x1,y1,x2,y2,x3,y3,...", "x1,y1,x2,y2,x3,y3,..."]):
        g.add_argument(f"--{flag}", action=Shape, metavar=form.upper(), dest=flag.replace("-", "_"))
    g.add_argument("--color", default=None, help="colour of the shapes given after it; shapes before any --color "
                   "take the last one given, else red. red, lime, blue, yellow, fuchsia, aqua, orange, purple, gold or R,G,B")
    g.add_argument("--width", type=line_width, help="line width in pixels, at least 1 (default: scaled to the image size)")
    g.add_argument("--alpha", type=int, help="opacity 0-255 (default 255; masks 88)")
    g.add_argument("--save-annotated", metavar="PATH", help="write the marked image here")
    q = p.add_argument_group("question files (questions.py; under torchrun each rank takes its share)",
                             "Exit status 1 when any question could not be answered (its record holds the error), "
                             "0 when all were; 2 for a usage error.")
    q.add_argument("--questions", metavar="IN.jsonl", help='answer every line {"question_id", "image", "text", ...}')
    q.add_argument("--answers", metavar="OUT.jsonl", help="append the answers here; a rerun skips those already in it")
    q.add_argument("--batch-size", type=int, default=8,
                   help="questions answered at once (the engine's slots: a finished answer's slot takes the next one)")
    q.add_argument("--merge", action="store_true", help="only merge the part files of a torchrun into --answers")
    p.set_defaults(marks=[])
    args = p.parse_args(negative_coordinates(sys.argv[1:] if argv is None else list(argv)))
    if args.image == "":
        p.error("--image is empty: give an image file or URL, or leave --image out to ask without an image")
    try:
        check_sampling(args.temperature, args.top_k or 0, args.top_p)
    except ValueError as e:
        p.error(f"--{str(e).replace('_', '-')}")
    if args.questions or args.answers or args.merge:
        if not (args.questions and args.answers):
            p.error("--questions and --answers go together (--merge needs both too)")
        if args.image or args.prompt or args.chat:
            p.error("--questions takes the images and questions from its file: drop --image, --prompt and --chat")
        if not Path(args.questions).is_file():
            p.error(f"no question file {args.questions}: check the path")
        if args.batch_size < 1:
            p.error(f"--batch-size must be at least 1, got {args.batch_size}")
        return args
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if (args.marks or args.save_annotated) and not args.image:
        p.error(f"{'visual prompts need' if args.marks else '--save-annotated needs'} --image")
    if args.prompt is None and not args.chat:
        p.error("--prompt is required (or use --chat to type questions)")
    for flag in ("prompt", "system"):
        try:
            refuse_image_token(getattr(args, flag) or "", f"--{flag}", "the image is placed in the prompt automatically")
        except ValueError as e:
            p.error(str(e))
    if args.save_annotated:
        check_writable(args.save_annotated, p)
    return args


def check_writable(path: str, p: Parser):
    """--save-annotated is written after the drawing, before the model loads: check the path up front."""
    from PIL import Image

    target = Path(path).expanduser()
    folder = target.parent
    if not folder.is_dir():
        p.error(f"--save-annotated: folder {folder} does not exist: create it first or choose another path")
    if target.is_dir():
        p.error(f"--save-annotated: {target} is a folder: give a file name such as {target / 'marked.png'}")
    if target.suffix.lower() not in Image.registered_extensions():
        p.error(f"--save-annotated: Pillow cannot tell an image format from {target.name!r}: end it in .png or .jpg")
    if not os.access(folder, os.W_OK) or target.exists() and not os.access(target, os.W_OK):
        p.error(f"--save-annotated: {target} cannot be written here (no permission): choose another path")


def annotate(args):
    """Load the image and draw the visual prompts on it, as the training data was drawn."""
    from processor import MAX_SIDE, load_image, reduction
    from visual_prompts import draw_visual_prompt, outside_crop, parse_color, parse_coords

    image = load_image(args.image)
    for flag, text, color in args.marks:
        shape = flag.replace("-", "_")
        coords = parse_coords(text, shape)
        image = draw_visual_prompt(image, shape, coords, parse_color(color or args.color or "red"), args.width, args.alpha)
        if args.image_mode == "crop" and outside_crop(coords, *image.size):
            log(f"warning: the --{flag} marker lies partly outside the square that --image-mode crop keeps; "
                f"the model will not see it whole (the default --image-mode pad keeps everything)")
    if args.save_annotated:
        try:
            image.save(args.save_annotated)
        except OSError as e:  # checked up front, but a full disk or a changed folder still fails here
            raise ValueError(f"--save-annotated: could not write {args.save_annotated} ({e.strerror or e}): "
                             f"choose another path") from e
        log(f"annotated image written to {args.save_annotated}")
    factor = reduction(*image.size)
    if factor > 1:  # the processor reduces it; the marks are already drawn in the user's pixels
        W, H = image.size
        log(f"note: the image is {W}x{H}, over {MAX_SIDE} px on a side: the model gets it reduced {factor}x, "
            f"to {-(-W // factor)}x{-(-H // factor)}, after the marks are drawn at full size")
    return image


def chat(args, model, processor, image):
    """Answer --prompt (and with --chat, the questions that follow on stdin), streaming to stdout.
    One ChatSession: each turn prefills only its new tokens; the image is encoded once."""
    session = ChatSession(model, processor, image=image, system=args.system, template=args.template,
                          image_mode=args.image_mode)
    question = args.prompt
    while True:
        if question is None:
            log("you> ", end="")
            question = sys.stdin.readline()
            if not question.strip():  # Ctrl-D or an empty line
                return
            question = question.rstrip("\n")
        try:
            session.ask(question, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, streamer=lambda piece: print(piece, end="", flush=True))
        except ValueError as e:
            if not args.chat:
                raise
            log(f"vipllava.py: error: {e}")  # the session goes on: ask something else
            question = None
            continue
        print(flush=True)
        if args.verbose:
            s = session
            decode_s = s.last_seconds - s.last_time_to_first_token
            rate = f"{(s.last_new_tokens - 1) / decode_s:.1f} tokens/s" if s.last_new_tokens > 1 and decode_s > 0 else "-"
            log(f"[{s.last_prefill_tokens} tokens prefilled, first token after {s.last_time_to_first_token:.2f} s, "
                f"{s.last_new_tokens} new tokens, {rate}]")
        if not args.chat:
            return
        question = None


def main(argv=None):
    args = parse_args(argv)
    from processor import VipLlavaProcessor

    try:
        if args.questions:
            import questions

            if args.merge:
                sys.exit(1 if questions.finish(Path(args.questions), Path(args.answers), 1) else 0)
            args.device = questions.setup_ranks(args.device)
        weights.resolve_device(args.device)
        image = annotate(args) if args.image else None
        t0 = time.perf_counter()
        try:
            processor = VipLlavaProcessor.from_pretrained(args.model, image_mode=args.image_mode)
            model = VipLlava.from_pretrained(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                             group_size=args.group_size, adapter=args.adapter, merge=not args.quantize)
        except OSError as e:
            if "could not fetch" in str(e):
                fail(f"cannot download {args.model!r} (offline, or the hub is unreachable) "
                         f"and no copy is cached: pass --model /path/to/folder holding its config.json, "
                         f"*.safetensors and tokenizer files (`hf download {args.model}` on a machine with network), "
                         f"or try the command line on a random one: `python tiny_checkpoint.py tiny`, then --model tiny")
            raise
        if args.verbose:
            log(f"[model loaded in {time.perf_counter() - t0:.1f} s on {weights.resolve_device(args.device)}]")
        if args.compile:
            log("compiling the decode step on the first answer (about a minute for the 7B)")
            model.compile_decode()
        if args.questions:
            if questions.answer(args, model, processor):
                sys.exit(1)  # some questions could not be answered: their records say why
        else:
            chat(args, model, processor, image)
    except (ValueError, OSError, KeyError, MemoryError, NotImplementedError) as e:
        fail(str(e.args[0] if isinstance(e, KeyError) and e.args else e))
    except KeyboardInterrupt:
        sys.exit(130)

