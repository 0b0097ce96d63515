"""Questions/s of the question-file runner (questions.py) at several batch sizes, in one process.

    python benchmarks/questions_bench.py [--preset 7b-shaped] [--batch-sizes 1 8] [--questions 16] [--max-new-tokens 64]

The model is loaded once; each batch size answers the same question file (the four test images, eight
question texts of 4-17 words, every third question marked with a box) from scratch, through the whole
runner: reading, the background image thread, batching by length, writing. Every answer is exactly
--max-new-tokens long (no EOS or "###" stop: random weights would stop at random places), so the batch
sizes do the same work. A one-question warm-up runs first. The checkpoint is bench.py's (--cache-dir).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import bench  # noqa: E402

TEXTS = ["What is this?", "Describe the animal in detail, please, with every part of it you can see.",
         "What colour is the marked region?", "Who?", "Is there anything unusual in the picture at all?",
         "Count the objects.", "What is inside the box?", "Where is the arrow pointing and why?"]


def question_file(folder: Path, n: int) -> Path:
    file = folder / "questions.jsonl"
    with open(file, "w") as f:
        for i in range(n):
            q = {"question_id": i, "image": str(ROOT / "tests" / "images" / ["chelsea.png", "horse.png", "coffee.png",
                                                                           "camera.png"][i % 4]), "text": TEXTS[i % 8]}
            if i % 3 == 0:
                q["visual_prompts"] = [{"shape": "box", "coords": [40, 40, 200, 200], "color": "red"}]
            f.write(json.dumps(q) + "\n")
    return file


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="7b-shaped", choices=["tiny", "7b-shaped"])
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "vipllava-bench")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    import cli
    import questions
    from processor import VipLlavaProcessor
    from vipllava import VipLlava

    folder = bench.checkpoint(a.preset, a.text_layers, a.cache_dir, a.device)
    model = VipLlava.from_pretrained(folder, dtype=a.dtype, device=a.device, verbose=False)
    processor = VipLlavaProcessor.from_pretrained(folder)
    no_stop = {"eos_token_id": [], "stop_strings": None}  # every answer exactly --max-new-tokens long
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        qfile = question_file(tmp, a.questions)

        def run(batch, n_new, file=qfile):
            out = tmp / f"answers-{batch}.jsonl"
            out.unlink(missing_ok=True)
            args = cli.parse_args(["--model", str(folder), "--questions", str(file), "--answers", str(out),
                                   "--batch-size", str(batch), "--max-new-tokens", str(n_new), "--device", a.device])
            t0 = time.perf_counter()
            questions.answer(args, model, processor, generation=no_stop)
            bench.synchronize(a.device)
            return time.perf_counter() - t0

        warm = tmp / "warm"
        warm.mkdir()
        run(1, 4, question_file(warm, 1))  # warm-up: threads, allocator, kernels
        for batch in a.batch_sizes:
            seconds = run(batch, a.max_new_tokens)
            results[batch] = a.questions / seconds
            print(f"batch {batch}: {a.questions} questions in {seconds:.1f} s, {results[batch]:.3f} questions/s",
                  file=sys.stderr, flush=True)
    first = results[a.batch_sizes[0]]
    print(f"\n| {a.preset} ({a.text_layers} text layers), {a.dtype}, {a.device}, {a.questions} questions x "
          f"{a.max_new_tokens} new tokens | questions/s | vs batch {a.batch_sizes[0]} |\n|---|---:|---:|")
    for batch, rate in results.items():
        print(f"| batch {batch} | {rate:.3f} | {rate / first:.2f}x |")


if __name__ == "__main__":
    main()
