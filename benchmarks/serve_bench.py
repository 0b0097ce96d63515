"""The server under load: 1, 4 and 8 concurrent chat clients through the real `openai` client, streaming.

    python benchmarks/serve_bench.py [--preset 7b-shaped] [--clients 1 4 8] [--max-tokens 48] [--dtype float32]

One server (server.py, through engine.py) is started once, with --max-slots the largest client count. In
each round every client sends a first question with its own photo, then a follow-up that resends the whole
conversation (question, answer, new question), as the drawing page and any OpenAI client do. Per round:

- aggregate output tokens/s: all streamed answer tokens over the round's wall time (prefills included);
- decode tokens/s: the tokens streamed while every client of the round was decoding (between the last
  first token and the first last token of the first turns) over that time: the batched decode step's rate;
- time to first token of the first turn (p50, p95) and of the follow-up, and their ratio, with the
  follow-ups' `usage.prompt_tokens_details.cached_tokens`.

Random weights would stop anywhere: answers run to --max-tokens (EOS or "###" by chance ends one early,
counted as it streams). A warm-up request runs first. The checkpoint is bench.py's (--cache-dir).
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import bench  # noqa: E402

IMAGES = ["chelsea", "coffee", "horse", "camera"]
FIRST = ["What is in the red box?", "Describe the image in detail.", "What is the animal doing?", "What is this?"]
FOLLOW = "And what colour is it?"


def data_url(name: str, variant: int) -> str:
    """A test photo as a PNG data URL; `variant` shifts it a pixel so that each client sends its own image."""
    from PIL import Image, ImageChops

    image = Image.open(ROOT / "tests" / "images" / f"{name}.png").convert("RGB")
    image = ImageChops.offset(image, variant, 0)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(client, messages, max_tokens: int) -> dict:
    """One streamed answer: its text, chunk arrival times, time to first token and usage."""
    t0, times, text, usage = time.perf_counter(), [], "", None
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            text += chunk.choices[0].delta.content
    cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None) or 0
    return {"text": text, "start": t0, "times": times, "ttft": times[0] - t0 if times else float("nan"),
            "tokens": usage.completion_tokens if usage else len(times), "prompt": usage.prompt_tokens if usage else 0,
            "cached": cached}


def client_session(client, i: int, max_tokens: int, out: list):
    url = data_url(IMAGES[i % len(IMAGES)], i // len(IMAGES) + 1)
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": FIRST[i % len(FIRST)]}]}]
    a = ask(client, first, max_tokens)
    follow = first + [{"role": "assistant", "content": a["text"]}, {"role": "user", "content": FOLLOW}]
    b = ask(client, follow, max_tokens)
    out[i] = (a, b)


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def round_of(client, n: int, max_tokens: int) -> dict:
    out = [None] * n
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_session, args=(client, i, max_tokens, out)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    firsts, follows = [a for a, _ in out], [b for _, b in out]
    lo, hi = max(a["times"][0] for a in firsts), min(a["times"][-1] for a in firsts)
    in_window = sum(lo < t <= hi for a in firsts for t in a["times"])
    ttft1, ttft2 = [a["ttft"] for a in firsts], [b["ttft"] for b in follows]
    return {"clients": n, "wall_s": wall,
            "output_tok_s": sum(a["tokens"] for a in firsts + follows) / wall,
            "decode_tok_s": in_window / (hi - lo) if hi > lo else float("nan"),
            "ttft_p50": statistics.median(ttft1), "ttft_p95": percentile(ttft1, 0.95),
            "follow_ttft_p50": statistics.median(ttft2),
            "follow_ratio": statistics.median(ttft2) / statistics.median(ttft1),
            "prompt_tokens": statistics.median(b["prompt"] for b in follows),
            "cached_tokens": statistics.median(b["cached"] for b in follows)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="7b-shaped", choices=["tiny", "7b-shaped"])
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "vipllava-bench")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from openai import OpenAI

    folder = bench.checkpoint(args.preset, args.text_layers, args.cache_dir)
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--model", str(folder), "--port", str(port),
                               "--dtype", args.dtype, "--device", args.device, "--max-slots", str(max(args.clients))],
                              cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                sys.exit("the server exited")
            time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
        client_session(client, 99, 4, [None] * 100)  # warm-up
        rows = [round_of(client, n, args.max_tokens) for n in args.clients]
    finally:
        server.terminate()
        server.wait()
    base = rows[0]
    print(f"\n{args.preset} ({args.text_layers} text layers), {args.dtype}, {args.device}, "
          f"max_tokens {args.max_tokens}; {bench.cpu_flags() if args.device == 'cpu' else args.device}\n")
    print("| clients | output tok/s | decode tok/s | decode vs 1 client | TTFT p50 | TTFT p95 | follow-up TTFT p50 "
          "| follow-up / first | follow-up cached / prompt tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['output_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
              f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {r['ttft_p50']:.2f} s | {r['ttft_p95']:.2f} s | "
              f"{r['follow_ttft_p50']:.2f} s | {r['follow_ratio']:.2f} | {r['cached_tokens']:.0f} / "
              f"{r['prompt_tokens']:.0f} |")


if __name__ == "__main__":
    main()
