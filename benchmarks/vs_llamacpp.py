"""Ours against llama.cpp on a CPU, on the same random 7b-shaped weights: prefill seconds and decode tokens/s.

    pip install -e ".[bench]"    # llama-cpp-python (builds llama.cpp: ~10 min on 2 cores) and gguf
    pip download --no-binary :all: --no-deps llama-cpp-python -d /tmp/llsrc && tar xzf /tmp/llsrc/*.tar.gz -C /tmp/llsrc
    python benchmarks/vs_llamacpp.py --convert /tmp/llsrc/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py \\
        [--text-layers 8] [--formats float32 bfloat16 int8 int4] [--prompt-tokens 616] [--new-tokens 64] [--repeats 3]

(llama-cpp-python's wheel has no converter: it is in its source archive.) The decoder is bench.py's 7b-shaped
checkpoint (`--text-layers` of the 32 Llama-7B layers, vocab 32064), written once in fp16; its language model
is copied as a plain LlamaForCausalLM folder, converted to GGUF F32 and BF16 by llama.cpp's converter, and
quantized from F32 to Q8_0 and Q4_0 by `llama_cpp.llama_model_quantize`. Formats side by side: float32 / F32,
bfloat16 / BF16, int8 (one scale per output channel) / Q8_0 (one per 32 weights), int4 g128 / Q4_0 (one scale
per 32; llama.cpp keeps its output matrix in Q6_K, ours keeps lm_head int8). Where llama.cpp crashes (its AMX
kernels segfaulted on the Xeon of README's table), it runs again without its extra buffer types, and the
table marks that row.

Each side runs in its own fresh process, the sides alternate (who goes first changes each round), and the
table shows medians of --repeats. Both sides get the same prompt token ids (no tokenizer), --threads threads,
greedy decoding: prefill is the time to the first token after the prompt; decode tok/s is --new-tokens
steps over the time after the first token (ours: generate(N + 1) minus generate(1); llama.cpp: N calls of
eval with an argmax of the logits). "GB/s" is the bytes of weights one decode step reads (ours: the loaded
model's tensors, as bench.py counts them; llama.cpp: the GGUF tensors but the embedding, plus one row of
it) times tokens/s; the machine's read bandwidth is measured in the same run (bench.read_bandwidth).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402  (the checkpoint, read bandwidth, bytes per step, CPU flags)

# ours: (dtype, quantize); llama.cpp: GGUF type, and llama_cpp's LLAMA_FTYPE_MOSTLY_* for those it quantizes
FORMATS = {"float32": ("float32", None, "F32"), "bfloat16": ("bfloat16", None, "BF16"),
           "int8": ("bfloat16", "int8", "Q8_0"), "int4": ("bfloat16", "int4", "Q4_0")}
WARMUP_TOKENS = 64


# ---------------------------------------------------------------------------- the weights, both formats
def llama_folder(folder: Path) -> Path:
    """The language model of a VipLlava checkpoint as a plain LlamaForCausalLM folder, for llama.cpp's converter:
    the same tensors (keys without `language_model.`), its config, and the tokenizer with its vocabulary padded
    with unused pieces to the model's 32064 rows (the converter wants one token per row; none is ever used)."""
    out = folder.with_name(folder.name + "-llama")
    if (out / "config.json").is_file():
        return out
    import shutil

    from safetensors import safe_open

    sys.path.insert(0, str(ROOT))
    import weights

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    state = {}
    for file in bench_shards(folder):
        with safe_open(file, "pt") as f:
            state |= {k.removeprefix("language_model."): f.get_tensor(k)
                      for k in f.keys() if k.startswith("language_model.")}
    weights.save_weights(state, tmp, max_shard_bytes=2 * 2**30)
    del state
    (tmp / "config.json").write_text(json.dumps(text | {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": config["torch_dtype"],
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}, indent=2))
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"] | {t["content"]: t["id"] for t in tok["added_tokens"]}  # <image>, <pad> too
    used = set(vocab.values())
    tok["model"]["vocab"] = vocab | {f"<unused{i}>": i for i in range(text["vocab_size"]) if i not in used}
    (tmp / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(folder / name, tmp / name)
    tmp.rename(out)
    return out


def bench_shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [folder / "model.safetensors"]


def gguf_file(llama: Path, kind: str, convert: Path | None, threads: int) -> Path:
    """llama's weights as GGUF of this type (F32, BF16 by the converter; Q8_0, Q4_0 quantized from F32), made once."""
    out = llama.with_name(f"{llama.name}-{kind}.gguf")
    if out.is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    if kind in ("F32", "BF16"):
        if convert is None or not convert.is_file():
            raise SystemExit(f"to write {out.name}, pass --convert PATH to llama.cpp's convert_hf_to_gguf.py (in "
                             "llama-cpp-python's source archive, vendor/llama.cpp/; see this file's docstring)")
        print(f"converting to {kind} (once)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(convert), str(llama), "--outtype", kind.lower(), "--outfile", str(tmp)],
                       check=True, stdout=subprocess.DEVNULL)
    else:
        import llama_cpp

        source = gguf_file(llama, "F32", convert, threads)
        print(f"quantizing to {kind} (once)", file=sys.stderr, flush=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}"), threads
        if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize to {kind} failed")
    tmp.rename(out)
    return out


def gguf_step_bytes(path: Path) -> int:
    """Bytes one decode step reads from a GGUF model: every tensor but the token embedding, and one row of it."""
    from gguf import GGUFReader

    total = 0
    for t in GGUFReader(path).tensors:
        total += int(t.n_bytes) // int(t.shape[-1]) if t.name == "token_embd.weight" else int(t.n_bytes)
    return total


# ---------------------------------------------------------------------------- a side, in its own process
def prompt_ids(n: int) -> list[int]:
    import torch

    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(0)).tolist()  # ordinary pieces


def ours_worker(folder: Path, fmt: str, prompt: int, new: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from vipllava import VipLlava

    torch.set_num_threads(threads)
    dtype, mode, _ = FORMATS[fmt]
    model = VipLlava.from_pretrained(folder, dtype=dtype, quantize=mode, verbose=False)
    ids = torch.tensor([prompt_ids(prompt)])

    def timed(n):
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, eos_token_id=[])
        return time.perf_counter() - t0, out[0].tolist()

    with torch.inference_mode():
        model.generate(ids[:, :WARMUP_TOKENS], max_new_tokens=4, eos_token_id=[])  # threads, allocator, kernels
        first, _ = timed(1)
        full, tokens = timed(new + 1)
    return {"prefill_s": first, "decode_tok_s": new / (full - first) if full > first else float("nan"),
            "tokens": tokens, "step_bytes": bench.model_decode_bytes(model)}


def llamacpp_worker(path: Path, prompt: int, new: int, threads: int, extra_buffers: bool = True) -> dict:
    import llama_cpp.llama_cpp as lib
    import numpy as np
    from llama_cpp import Llama

    if not extra_buffers:  # llama-cpp-python has no argument for it: the model parameters' default, changed
        defaults = lib.llama_model_default_params

        def without_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params
        lib.llama_model_default_params = without_extra_buffers
    llm = Llama(str(path), n_ctx=prompt + new + 16, n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = prompt_ids(prompt)

    def argmax():  # of the last position's logits (Llama.eval keeps none unless logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))

    def run(ids, n):  # greedy: the token after the prompt, then n steps
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tokens = [argmax()]
        t1 = time.perf_counter()
        for _ in range(n):
            llm.eval(tokens[-1:])
            tokens.append(argmax())
        return t1 - t0, time.perf_counter() - t1, tokens

    run(ids[:WARMUP_TOKENS], 4)
    prefill, decode, tokens = run(ids, new)
    return {"prefill_s": prefill, "decode_tok_s": new / decode, "tokens": tokens}


class WorkerCrashed(RuntimeError):
    pass


def spawn(*args) -> dict:
    """This file as a worker in a fresh interpreter; its last stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode < 0:
        raise WorkerCrashed(f"worker {args} died of signal {-proc.returncode}:\n{proc.stderr[-2000:]}")
    if proc.returncode:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- the parent
def common_prefix(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run(args) -> dict:
    folder = bench.checkpoint("7b-shaped", args.text_layers, args.cache_dir)
    llama = llama_folder(folder)
    ggufs = {fmt: gguf_file(llama, FORMATS[fmt][2], args.convert, args.threads) for fmt in args.formats}
    bandwidth = [bench.read_bandwidth(2**30)]
    rows, no_extra = {}, {fmt: [] for fmt in args.formats}
    for fmt in args.formats:
        runs = {"ours": [], "llama.cpp": []}
        for r in range(args.repeats):
            for side in ("ours", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "ours"):
                common = ["--prompt-tokens", args.prompt_tokens, "--new-tokens", args.new_tokens,
                          "--threads", args.threads]
                target = ["--folder", folder] if side == "ours" else ["--gguf", ggufs[fmt]]
                try:
                    runs[side].append(spawn("--worker", side, "--formats", fmt, *target, *common, *no_extra[fmt]))
                except WorkerCrashed:
                    if side == "ours" or no_extra[fmt]:
                        raise
                    # ggml's AMX kernels crash on some machines (a segfault in ggml_backend_amx_mul_mat on the
                    # Xeon of README's table): then llama.cpp runs without its extra buffer types, and says so
                    print(f"llama.cpp crashed on {fmt}: again without extra buffer types (AMX, repacking)",
                          file=sys.stderr, flush=True)
                    no_extra[fmt] = ["--no-extra-buffers"]
                    runs[side].append(spawn("--worker", side, "--formats", fmt, *target, *common, *no_extra[fmt]))
                shown = {k: v for k, v in runs[side][-1].items() if k != "tokens"}
                print(f"{fmt} round {r + 1}/{args.repeats}, {side}: {json.dumps(shown)}", file=sys.stderr, flush=True)
        med = {side: {k: statistics.median(run[k] for run in rs) for k in ("prefill_s", "decode_tok_s")}
               for side, rs in runs.items()}
        med["ours"]["step_bytes"] = runs["ours"][0]["step_bytes"]
        med["llama.cpp"]["step_bytes"] = gguf_step_bytes(ggufs[fmt])
        for m in med.values():
            m["gb_s"] = m["step_bytes"] * m["decode_tok_s"] / 1e9
        rows[fmt] = med | {"same_tokens": common_prefix(runs["ours"][0]["tokens"], runs["llama.cpp"][0]["tokens"]),
                           "gguf": FORMATS[fmt][2], "llamacpp_extra_buffers": not no_extra[fmt], "runs": runs}
    bandwidth.append(bench.read_bandwidth(2**30))
    import os

    import llama_cpp

    return {"rows": rows, "bandwidth_gb_s": max(bandwidth), "text_layers": args.text_layers, "repeats": args.repeats,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads,
            "llama_cpp_python": llama_cpp.__version__, "cpu": bench.cpu_flags(), "load_average": os.getloadavg()[1]}


def table(r: dict) -> str:
    lines = [f"| 7b-shaped ({r['text_layers']} text layers), {r['prompt_tokens']}-token prompt "
             "| prefill s ours / llama.cpp "
             "| decode tok/s ours / llama.cpp | weights read per step ours / llama.cpp | GB/s ours / llama.cpp "
             f"| same greedy tokens (of {r['new_tokens'] + 1}) |", "|---|---:|---:|---:|---:|---:|"]
    for fmt, row in r["rows"].items():
        o, l = row["ours"], row["llama.cpp"]
        name = "int4 g128" if fmt == "int4" else fmt
        prefill, decode = o["prefill_s"] / l["prefill_s"], o["decode_tok_s"] / l["decode_tok_s"]
        lines.append(f"| {name} / {row['gguf']} | {o['prefill_s']:.2f} / {l['prefill_s']:.2f} ({prefill:.2f}x) "
                     f"| {o['decode_tok_s']:.2f} / {l['decode_tok_s']:.2f} (**{decode:.2f}x**) "
                     f"| {o['step_bytes'] / 1e9:.2f} / {l['step_bytes'] / 1e9:.2f} GB "
                     f"| {o['gb_s']:.0f} / {l['gb_s']:.0f} "
                     f"| {row['same_tokens']} |")
        if not row["llamacpp_extra_buffers"]:
            lines[-1] = lines[-1].replace(f"/ {row['gguf']} |", f"/ {row['gguf']} (*) |")
    if not all(row["llamacpp_extra_buffers"] for row in r["rows"].values()):
        lines.append("\n(*) llama.cpp without its extra buffer types (use_extra_bufts=False: no AMX kernels, no "
                     "weight repacking): with them it crashed on this machine (ggml_backend_amx_mul_mat)")
    lines.append(f"\nread bandwidth {r['bandwidth_gb_s']:.1f} GB/s (bench.read_bandwidth, the best of the run); "
                 f"{r['new_tokens']} greedy steps, {r['threads']} threads, "
                 f"medians of {r['repeats']} fresh process(es) per side, "
                 f"sides alternating; llama-cpp-python {r['llama_cpp_python']}; the machine's load average (5 min) "
                 f"at the end: {r['load_average']:.1f}")
    lines.append(r["cpu"])
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-layers", type=int, default=8,
                   help="decoder layers of the 7b-shaped checkpoint (the real: 32)")
    p.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    p.add_argument("--prompt-tokens", type=int, default=616, help="tokens of the prompt (616: an image and 40 tokens)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps timed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="rounds of both sides per format; medians are reported")
    p.add_argument("--convert", type=Path,
                   help="llama.cpp's convert_hf_to_gguf.py (needed once, to write the GGUF files)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / ".cache")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead of the table")
    p.add_argument("--worker", choices=["ours", "llama.cpp"], help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--no-extra-buffers", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "ours":
        out = ours_worker(args.folder, args.formats[0], args.prompt_tokens, args.new_tokens, args.threads)
    elif args.worker == "llama.cpp":
        out = llamacpp_worker(args.gguf, args.prompt_tokens, args.new_tokens, args.threads, not args.no_extra_buffers)
    else:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        out = run(args)
    print(json.dumps(out) if args.worker or args.json else table(out), flush=True)


if __name__ == "__main__":
    main()
