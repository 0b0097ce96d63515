"""Continuous batching (engine.py, what questions.py now uses) against the static length-sorted batches of the
question-file runner before it, on the same requests with answers of mixed lengths, in one process.

    python benchmarks/questions_bench.py [--preset small] [--batch-size 8] [--questions 16] [--repeats 2]

Each question gets its own answer length, drawn from --min-new..--max-new (seeded): random weights would stop
on EOS or "###" at random places, so EOS is off on both sides and the length is each request's max_new_tokens.

- static (the old questions.py): questions sorted by prompt length and cut into batches of --batch-size, each
  batch one `generate` call (left-padded) that runs until its longest answer is done; a short answer's row keeps
  stepping (padding) until then.
- engine: every request submitted at once to an Engine with --batch-size slots; a finished answer's slot takes
  the next request.

Two workloads: "text" (no image, ~40-token prompts: the scheduling alone) and "image" (a 576-token image per
question, each image marked with its own box so that no two share the engine's prefix or feature cache: the
prefill, the same work on both sides, dilutes the gain). Images are preprocessed before the clock starts on
both sides. Each side runs --repeats times, alternating, and its fastest run is reported (the cores may be
shared with other jobs). The questions are numbered, so that no two prompts are alike: the engine reuses only the system
line they share. The answers of the two sides are compared token for token (greedy). Presets: `small` (tiny vision
tower, a Llama of 1024 wide x 4 layers with the 7B's vocabulary; written once to --cache-dir), `tiny`,
`7b-shaped` (bench.py's, with --text-layers).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import bench  # noqa: E402

TEXTS = ["What is this?", "Describe the animal in detail, please, with every part of it you can see.",
         "What colour is the marked region?", "Who?", "Is there anything unusual in the picture at all?",
         "Count the objects.", "What is inside the box?", "Where is the arrow pointing and why?"]
IMAGES = ["chelsea.png", "horse.png", "coffee.png", "camera.png"]
SMALL_TEXT = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=16, max_position_embeddings=2048, vocab_size=32064)


def checkpoint(preset: str, text_layers: int, cache_dir: Path, device: str) -> Path:
    if preset != "small":
        return bench.checkpoint(preset, text_layers, cache_dir, device)
    folder = cache_dir / "questions-small"
    if not (folder / "config.json").is_file():
        from tiny_checkpoint import write_checkpoint

        print(f"writing the small checkpoint to {folder} (once)", file=sys.stderr, flush=True)
        write_checkpoint(folder, text=SMALL_TEXT, dtype="float32")
    return folder


def requests(processor, n: int, with_image: bool, lengths: list[int]) -> list[dict]:
    """n prompts: {"ids", "prompt", "pixel_values" (1, 3, H, W) or None, "image", "n_new"}."""
    from processor import SYSTEM_PROMPT, load_image
    from visual_prompts import draw_visual_prompt

    out = []
    for i in range(n):
        # Numbered: no two prompts alike, so the engine's prefix cache reuses only the shared system line.
        content = [{"type": "text", "text": f"{i}. {TEXTS[i % len(TEXTS)]}"}]
        image = pixels = None
        if with_image:
            content.insert(0, {"type": "image"})
            image = draw_visual_prompt(load_image(ROOT / "tests" / "images" / IMAGES[i % 4]), "rectangle",
                                       [10 + 5 * i, 20, 150 + 3 * i, 200], "red")  # its own pixels: no cache hit
            pixels = processor.image_processor([image])["pixel_values"]
        conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},  # as questions.py
                        {"role": "user", "content": content}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        out.append({"ids": processor.encode(prompt), "prompt": prompt, "pixel_values": pixels, "image": image,
                    "n_new": lengths[i]})
    return out


def static_order(reqs: list[dict]) -> list[int]:
    return sorted(range(len(reqs)), key=lambda i: (len(reqs[i]["ids"]), i))  # the old plan's (length, line)


def run_static(model, processor, reqs: list[dict], batch_size: int) -> tuple[float, list]:
    """The old runner's scheduling: sorted by prompt length, batches of batch_size, each to its longest answer."""
    import torch

    order = static_order(reqs)
    batches = []
    for k in range(0, len(order), batch_size):  # inputs made before the clock starts (the old runner's thread)
        idx = order[k:k + batch_size]
        images = [[reqs[i]["image"]] for i in idx] if reqs[0]["image"] is not None else None
        batches.append((idx, processor([reqs[i]["prompt"] for i in idx], images=images)))
    tokens = [None] * len(reqs)
    t0 = time.perf_counter()
    for idx, inputs in batches:
        longest = max(reqs[i]["n_new"] for i in idx)
        new = model.generate(inputs["input_ids"], inputs.get("pixel_values"), inputs["attention_mask"],
                             max_new_tokens=longest, eos_token_id=[])  # (B, longest)
        for i, row in zip(idx, new):
            tokens[i] = row[:reqs[i]["n_new"]].tolist()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens


def run_engine(model, processor, reqs: list[dict], batch_size: int) -> tuple[float, list]:
    """Every request submitted at once; batch_size slots; a finished request's slot takes the next one."""
    from engine import Engine, Request

    context = max(len(r["ids"]) + r["n_new"] for r in reqs)
    t0 = time.perf_counter()
    engine = Engine(model, processor, max_slots=batch_size, max_queue=len(reqs) + 1, context=context)
    engine.eos = set()  # as eos_token_id=[] on the static side: every answer runs to its own n_new
    try:
        submitted = [engine.submit(Request(r["ids"], r["pixel_values"], max_new_tokens=r["n_new"])) for r in reqs]
        tokens = [r.result().tokens for r in submitted]
    finally:
        engine.close()
    return time.perf_counter() - t0, tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", choices=["small", "tiny", "7b-shaped"])
    p.add_argument("--text-layers", type=int, default=2, help="7b-shaped only")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "vipllava-bench")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating; the fastest is reported")
    p.add_argument("--min-new", type=int, default=8)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--workloads", nargs="+", default=["text", "image"], choices=["text", "image"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    import torch

    from processor import VipLlavaProcessor
    from vipllava import VipLlava

    folder = checkpoint(a.preset, a.text_layers, a.cache_dir, a.device)
    model = VipLlava.from_pretrained(folder, dtype=a.dtype, device=a.device, verbose=False)
    processor = VipLlavaProcessor.from_pretrained(folder)
    lengths = [random.Random(a.seed + i).randint(a.min_new, a.max_new) for i in range(a.questions)]
    rows = []
    with torch.inference_mode():
        for workload in a.workloads:
            reqs = requests(processor, a.questions, workload == "image", lengths)
            warm = [dict(r, n_new=2) for r in reqs[:2]]
            run_static(model, processor, warm, 2), run_engine(model, processor, warm, 2)  # threads, allocator, kernels
            static_s = engine_s = float("inf")
            for _ in range(a.repeats):  # alternating; the best of each side (other jobs share this machine's cores)
                seconds, static_tokens = run_static(model, processor, reqs, a.batch_size)
                static_s = min(static_s, seconds)
                seconds, engine_tokens = run_engine(model, processor, reqs, a.batch_size)
                engine_s = min(engine_s, seconds)
            same = sum(s == e for s, e in zip(static_tokens, engine_tokens))
            prompt = sum(len(r["ids"]) for r in reqs) / len(reqs)
            order, b = static_order(reqs), a.batch_size
            steps = sum(max(reqs[i]["n_new"] for i in order[k:k + b]) for k in range(0, len(order), b))
            print(f"{workload}: static {static_s:.1f} s ({steps} decode steps of {b} rows), engine {engine_s:.1f} s "
                  f"(at least {-(-sum(lengths) // b)} steps), {same}/{len(reqs)} answers the same",
                  file=sys.stderr, flush=True)
            rows.append((workload, prompt, a.questions / static_s, a.questions / engine_s, same))
    print(f"\n{bench.cpu_flags() if a.device == 'cpu' else a.device}")
    print(f"\n| {a.preset}, {a.dtype}, {a.device}, batch size {a.batch_size}, {a.questions} questions, "
          f"{a.min_new}-{a.max_new} new tokens ({sum(lengths)} in all), best of {a.repeats} | static q/s | engine q/s "
          f"| engine / static | answers equal |\n|---|---:|---:|---:|---:|")
    for workload, prompt, static, eng, same in rows:
        print(f"| {workload} (prompts of {prompt:.0f} tokens) | {static:.3f} | {eng:.3f} | {eng / static:.2f}x "
              f"| {same}/{a.questions} |")


if __name__ == "__main__":
    main()
