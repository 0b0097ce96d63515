"""The server under load: 1, 4 and 8 concurrent chat clients through the real `openai` client, streaming.

    python benchmarks/serve_bench.py [--preset 7b-shaped] [--clients 1 4 8] [--max-tokens 64] [--dtype float32]

One server (server.py, through engine.py) is started once, with --max-slots the largest client count. For each
client count n, two rounds:

- text: n clients ask a text-only question at once (prefills of ~40 tokens, so they decode together) for
  --max-tokens tokens each. Decode tokens/s: the tokens streamed while all n were decoding (between the last
  first token and the first last token) over that time, the batched decode step's rate; and all their tokens
  over the time from the first token to the last (the others' prefills in between);
- conversation: each client sends a first question with its own photo (a pixel-shifted copy: no two share the
  prefix or feature cache), then a follow-up that resends the whole conversation (question, answer, new
  question), as the drawing page and any OpenAI client do. Time to first token of the first turn (p50, p95;
  each photo's ~600-token prefill is done one at a time, so the p95 includes waiting for the others'), of the
  follow-up, their ratio, and the follow-ups' `usage.prompt_tokens_details.cached_tokens`.

Answers are greedy. The checkpoint is bench.py's (--cache-dir): the 7B's vocabulary of 32064 ids over a
tokenizer of 581 pieces, so random weights mostly pick ids that decode to nothing and an answer would stream
nothing until it ends. The server this script starts (`--serve`: server.py's main with its model patched after
loading) zeroes the lm_head rows of every id that does not decode to plain text, and of EOS and "#": those
logits are 0, below the best of the others (581 random logits of ~0.6 std: the largest is ~2), so every token
streams a piece and every answer runs to its max_tokens. The cost of a step is unchanged. A warm-up runs first.
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
import torch  # noqa: E402

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


def visible_only(model, processor):
    """Zero the lm_head rows of ids that stream no text (see the docstring above): greedy answers stream."""
    eos = model.generation_config.eos_token_id
    keep = []
    for i in range(len(processor.tokenizer.get_vocab())):
        text = processor.decode([i], skip_special_tokens=True)
        if i != eos and text.strip() and "#" not in text and "\ufffd" not in text:
            keep.append(i)
    weight = model.language_model.lm_head.weight  # (vocab, C)
    hidden = torch.ones(weight.shape[0], dtype=torch.bool)
    hidden[keep] = False
    with torch.no_grad():
        weight[hidden.to(weight.device)] = 0


def serve(argv):
    """server.py's main, its model patched by visible_only once loaded (this script runs it as a subprocess)."""
    import server

    load = server.load

    def load_visible(args):
        model, processor = load(args)
        visible_only(model, processor)
        return model, processor

    server.load = load_visible
    server.main(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(client, messages, max_tokens: int) -> dict:
    """One streamed answer: its text, chunk arrival times, time to first token and usage."""
    t0, times, text, usage = time.perf_counter(), [], "", None
    stream = client.chat.completions.create(model=client.served, messages=messages, max_tokens=max_tokens,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
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


def conversation(client, i: int, max_tokens: int, out: list):
    url = data_url(IMAGES[i % len(IMAGES)], i // len(IMAGES) + 1)
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": FIRST[i % len(FIRST)]}]}]
    a = ask(client, first, max_tokens)
    follow = first + [{"role": "assistant", "content": a["text"]}, {"role": "user", "content": FOLLOW}]
    out[i] = (a, ask(client, follow, max_tokens))


def text_question(client, i: int, max_tokens: int, out: list):
    out[i] = ask(client, [{"role": "user", "content": f"Question {i}: tell me a long story."}], max_tokens)


def at_once(target, client, n: int, max_tokens: int) -> list:
    out = [None] * n
    threads = [threading.Thread(target=target, args=(client, i, max_tokens, out)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def round_of(client, n: int, max_tokens: int) -> dict:
    texts = at_once(text_question, client, n, max_tokens)
    t0, t1 = min(a["times"][0] for a in texts), max(a["times"][-1] for a in texts)
    lo, hi = max(a["times"][0] for a in texts), min(a["times"][-1] for a in texts)  # all n decoding
    talks = at_once(conversation, client, n, max(16, max_tokens // 4))
    firsts, follows = [a for a, _ in talks], [b for _, b in talks]
    ttft1, ttft2 = [a["ttft"] for a in firsts], [b["ttft"] for b in follows]
    return {"clients": n, "decode_tok_s": sum(lo < t <= hi for a in texts for t in a["times"]) / (hi - lo),
            "span_tok_s": (sum(a["tokens"] for a in texts) - n) / (t1 - t0),
            "ttft_p50": statistics.median(ttft1), "ttft_p95": percentile(ttft1, 0.95),
            "follow_ttft_p50": statistics.median(ttft2),
            "follow_ratio": statistics.median(ttft2) / statistics.median(ttft1),
            "prompt_tokens": statistics.median(b["prompt"] for b in follows),
            "cached_tokens": statistics.median(b["cached"] for b in follows)}


def main():
    if sys.argv[1:2] == ["--serve"]:
        return serve(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="7b-shaped", choices=["tiny", "7b-shaped"])
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "vipllava-bench")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=64, help="the text round's answers (conversations: a quarter)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from openai import OpenAI

    folder = bench.checkpoint(args.preset, args.text_layers, args.cache_dir)
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--model", str(folder), "--port", str(port),
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
        client.served = client.models.list().data[0].id
        conversation(client, 99, 4, [None] * 100)  # warm-up
        rows = [round_of(client, n, args.max_tokens) for n in args.clients]
    finally:
        server.terminate()
        server.wait()
    base = rows[0]
    print(f"\n{args.preset} ({args.text_layers} text layers), {args.dtype}, {args.device}, "
          f"max_tokens {args.max_tokens}; {bench.cpu_flags() if args.device == 'cpu' else args.device}\n")
    print("| clients | decode tok/s, all decoding | vs 1 client | first to last token | first turn: time to first token p50 | p95 | follow-up: p50 "
          "| follow-up / first turn | follow-up: cached / prompt tokens |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f}x | "
              f"{r['span_tok_s']:.1f} tok/s | "
              f"{r['ttft_p50']:.2f} s | {r['ttft_p95']:.2f} s | {r['follow_ttft_p50']:.2f} s | {r['follow_ratio']:.2f} | "
              f"{r['cached_tokens']:.0f} / {r['prompt_tokens']:.0f} |")

if __name__ == "__main__":
    main()
