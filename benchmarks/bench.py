"""Ours against transformers on the same random checkpoint, in the same run.

    python benchmarks/bench.py --preset 7b-shaped --dtype float32 bfloat16 [--repeats 3] [--json]
    python benchmarks/bench.py --device cuda --text-layers 32 --dtype bfloat16 --repeats 1 --compile
    python benchmarks/bench.py --chat --preset 7b-shaped   # a ChatSession's turn 2 vs turn 1 (ours only)
    python benchmarks/bench.py --dtype bfloat16 --quantize int8 int4   # and ours with int8 / int4 weights

Each side runs in its own fresh subprocess (so load time and peak memory are its own), the sides
alternate for --repeats rounds, and the table shows medians. Measured per side: load time
(from_pretrained; imports are reported apart); peak resident memory (and GPU memory on CUDA);
vision tower + projector for one image; prefill (generate one token after one image + 40 text
tokens); decode tokens/s at batch 1 and batch 4 (a 40-token text prompt, greedy, no early stop):
32 new tokens over the time of generating 33 tokens minus the time of generating 1. Each side
warms up its decoder and vision tower before the timed runs. With --compile a third side runs
ours with `compile_decode()` (torch.compile of the decode step; compile time is in the warm-up).
The machine's read bandwidth is measured in the same run: one decode step reads every decoder
weight, the final norm, lm_head and one embedding row, so bandwidth / those bytes bounds tokens/s
at batch 1 (KV-cache reads, ~2% here, are left out of the bound).

Presets: `tiny` (seconds, the CI smoke test) and `7b-shaped` (the real widths: CLIP ViT-L/14-336
with all 24 layers, projector 5x1024 -> 4096, Llama 4096/11008/32 heads/vocab 32064, with
--text-layers decoder layers so it fits a small machine). Checkpoints are random, written once in
the official hub layout in fp16 (like the real one) and cached in --cache-dir.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_TEXT, N_NEW, WARMUP_NEW = 40, 32, 4  # prompt text tokens; decode tokens timed after the first; warm-up tokens
QUANT_RATIOS = {"decode_b1": "decode_tok_s_b1", "decode_b4": "decode_tok_s_b4", "prefill": "prefill_s",
                "vision": "vision_s", "load": "load_s", "peak_rss": "peak_rss_gb"}  # quantized / ours bfloat16
METRICS = ["load_s", "import_s", "peak_rss_gb", "peak_gpu_gb", "vision_s", "prefill_s", "decode_tok_s_b1", "decode_tok_s_b4"]


# ---------------------------------------------------------------------------- the checkpoint
def checkpoint(preset: str, text_layers: int, cache_dir: Path, device: str = "cpu") -> Path:
    """The preset's random checkpoint, written on first use (to a temporary folder, then renamed)."""
    name = "tiny" if preset == "tiny" else f"7b-shaped-{text_layers}-layers"
    folder = cache_dir / name
    if (folder / "config.json").is_file():
        return folder
    sys.path.insert(0, str(ROOT))
    import shutil

    from tiny_checkpoint import TEXT_7B, VISION_7B, write_checkpoint

    tmp = cache_dir / f"{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"writing the {preset} checkpoint to {folder} (once)", file=sys.stderr, flush=True)
    if preset == "tiny":
        write_checkpoint(tmp, dtype="float16")
    else:
        # num_key_value_heads too: write_checkpoint fills missing fields from its tiny shapes (GQA with 2 heads).
        text = TEXT_7B | dict(num_hidden_layers=text_layers, num_key_value_heads=TEXT_7B["num_attention_heads"])
        write_checkpoint(tmp, text=text, vision=VISION_7B, dtype="float16", device=device)
    tmp.rename(folder)
    return folder


def decode_bytes(config: dict, itemsize: int) -> int:
    """Bytes of weights one decode step reads: every decoder layer, the final norm, lm_head, one embedding row."""
    t = config["text_config"]
    h, i, nh = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"]
    hd = t.get("head_dim") or h // nh
    nkv = t.get("num_key_value_heads") or nh
    layer = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * i + 2 * h  # q k v o, gate up down, 2 norms
    return (t["num_hidden_layers"] * layer + h + t["vocab_size"] * h + h) * itemsize


def model_decode_bytes(model) -> int:
    """Bytes one decode step of this loaded model reads, from its tensors: the decoder layers, the final
    norm and lm_head (quantized ones in the form their kernel reads: Int8Linear's int8 weight and the bf16
    scales of the CPU kernel; Int4Linear's packed weight and scales_and_zeros, or portable scales and zeros),
    and one row of the embedding. Non-persistent buffers (the KV cache, rotary tables) are left out."""
    import quantize

    lm = model.language_model
    total = 0
    for prefix, module in [("layers", lm.model.layers), ("norm", lm.model.norm), ("lm_head", lm.lm_head)]:
        for name, m in [(prefix, module), *((f"{prefix}.{n}", sub) for n, sub in module.named_modules() if n)]:
            tensors = dict(m.named_parameters(recurse=False)) | {k: v for k, v in m.named_buffers(recurse=False)
                                                                 if k not in m._non_persistent_buffers_set}
            if isinstance(m, quantize.Int8Linear) and m.scales_bf16 is not None:
                tensors["scales"] = m.scales_bf16  # what the CPU kernel reads
            total += sum(t.numel() * t.element_size() for t in tensors.values() if t is not None)
    embed = lm.model.embed_tokens.weight
    return total + embed.shape[1] * embed.element_size()


def cpu_flags() -> str:
    """torch's CPU capability and the AVX-512/AVX2/AMX flags of /proc/cpuinfo, for the table's footer."""
    import torch

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "f16c"))
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?") if Path("/proc/cpuinfo").is_file() else "?"
    return (f"CPU: {model}, {torch.get_num_threads()} threads; torch {torch.__version__} CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; flags: {' '.join(wanted) or 'none of avx2/avx512/amx'}")


def read_bandwidth(n_bytes: int, device: str = "cpu") -> float:
    """Memory read bandwidth in GB/s: the best of a few sums over a buffer much larger than the caches."""
    import torch

    x = torch.ones(n_bytes // 4, device=device)
    best = float("inf")
    for _ in range(10):
        synchronize(device)
        t0 = time.perf_counter()
        x.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def synchronize(device):
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- a side, in its own subprocess
def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss
    over exec from the process that spawned us, so a worker would report at least its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def model_worker(side: str, folder: Path, dtype_name: str, device: str, group_size: int = 128) -> dict:
    t_import = time.perf_counter()
    import torch

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    config = json.loads((folder / "config.json").read_text())
    image_token, image_seq = config["image_token_index"], config["image_seq_length"]
    image_size = config["vision_config"]["image_size"]

    if side.startswith("ours"):
        sys.path.insert(0, str(ROOT))
        from vipllava import VipLlava

        imported = time.perf_counter() - t_import
        t0 = time.perf_counter()
        mode = side.removeprefix("ours_") if side in ("ours_int8", "ours_int4") else None
        model = VipLlava.from_pretrained(folder, dtype=dtype, device=device, verbose=False, quantize=mode,
                                         group_size=group_size)
        synchronize(device)
        load = time.perf_counter() - t0
        if side == "ours_compiled":
            model.compile_decode()

        def vision(px):
            return model.get_image_features(px)

        def generate(ids, px, n):
            return model.generate(ids, px, max_new_tokens=n, eos_token_id=[])
    else:
        from transformers import VipLlavaForConditionalGeneration

        imported = time.perf_counter() - t_import
        t0 = time.perf_counter()
        placed = {} if device == "cpu" else {"device_map": device}  # straight to the GPU, as users load it
        model = VipLlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, **placed).eval()
        synchronize(device)
        load = time.perf_counter() - t0

        def vision(px):
            out = model.model.get_image_features(pixel_values=px)
            return getattr(out, "pooler_output", out)

        def generate(ids, px, n):
            images = {} if px is None else {"pixel_values": px}  # transformers fails on an explicit None
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                  pad_token_id=config["pad_token_id"], **images)[:, ids.shape[1]:]

    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 300, (4, N_TEXT), generator=g)  # ordinary pieces of the tokenizer
    half = N_TEXT // 2
    image_ids = torch.cat([text[:1, :half], torch.full((1, image_seq), image_token), text[:1, half:]], dim=1)
    text, image_ids = text.to(device), image_ids.to(device)
    px = torch.randn(1, 3, image_size, image_size, generator=g).to(device, dtype)

    def timed(fn, *args):
        synchronize(device)
        t0 = time.perf_counter()
        result = fn(*args)
        synchronize(device)
        return time.perf_counter() - t0, result

    def generate_time(ids, pixel_values, n):
        seconds, new = timed(generate, ids, pixel_values, n)
        assert new.shape == (ids.shape[0], n), new.shape
        return seconds

    out = {"load_s": load, "import_s": imported}  # load is from_pretrained alone; imports are reported apart
    with torch.inference_mode():
        generate_time(text[:1], None, WARMUP_NEW)  # warm-up: threads, allocator, kernels of the decoder
        vision(px)  # and of the vision tower: a first pass runs up to 30% slower (fresh memory, kernel setup)
        out["vision_s"], features = timed(vision, px)
        assert features.shape[-2] == image_seq
        generate_time(image_ids, px, 1)  # a first long prompt runs slower too (fresh memory)
        out["prefill_s"] = generate_time(image_ids, px, 1)
        for batch in (1, 4):
            generate_time(text[:batch], None, N_NEW + 1)  # warm-up at this batch size (and compile, if any)
            # the better of two each: one slowed by another process could make the difference negative
            first = min(generate_time(text[:batch], None, 1) for _ in range(2))
            full = min(generate_time(text[:batch], None, N_NEW + 1) for _ in range(2))
            # a difference of two timings: on a busy machine it can come out <= 0, then it is not a measurement
            out[f"decode_tok_s_b{batch}"] = batch * N_NEW / (full - first) if full > first else float("nan")
    out["peak_rss_gb"] = peak_rss_bytes() / 1e9
    out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else 0.0
    if side.startswith("ours"):
        import quantize

        out["weights_gb"] = quantize.weight_bytes(model) / 1e9  # quantized buffers too
        out["decode_bytes_per_step"] = model_decode_bytes(model)
    else:
        out["weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    return out


def spawn(*args) -> dict:
    """Run this file as a worker in a fresh interpreter; its last stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-4000:]}")
    sys.stderr.write(proc.stderr[-4000:])  # warnings (e.g. from torch.compile) stay visible
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- conversations (--chat)
CHAT_QUESTION, CHAT_ANSWER = 20, 40  # tokens of each question, and of the answer turn 2 follows


def words_of(processor, n_tokens: int, offset: int = 0) -> str:
    """Words of the tokenizer's own corpus (so they are ordinary pieces) that tokenize to n_tokens tokens."""
    from tiny_checkpoint import CORPUS

    text = ""
    for word in (CORPUS.split()[offset:] + CORPUS.split()) * 2:
        longer = (text + " " + word).strip()
        n = len(processor.tokenizer.encode(longer, add_special_tokens=False))
        if n <= n_tokens:  # a word that would overshoot is skipped: a shorter one comes along
            text = longer
        if n == n_tokens:
            return text
    raise ValueError(f"no text of {n_tokens} tokens in the corpus")


def chat_worker(folder: Path, dtype_name: str, device: str, repeats: int) -> dict:
    """Time to first token of a ChatSession's turn 2 (a 20-token question after a 40-token answer) against
    turn 1 (vision tower + prefill of the system line, the image and a 20-token question), and against
    turn 2 prefilled from scratch (one generate over the whole prompt: what --chat did before sessions).
    The turn-1 answer is a fixed 40-token text (the random model's own would be gibberish of any length),
    put in the cache with ChatSession.prefill as if the model had generated it."""
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from processor import VipLlavaProcessor
    from generate import ChatSession
    from vipllava import VipLlava

    torch.manual_seed(0)
    model = VipLlava.from_pretrained(folder, dtype=getattr(torch, dtype_name), device=device, verbose=False)
    processor = VipLlavaProcessor.from_pretrained(folder)
    size = json.loads((folder / "config.json").read_text())["vision_config"]["image_size"]
    image = Image.fromarray(torch.randint(0, 256, (size, size, 3), dtype=torch.uint8).numpy())
    # From the corpus' "What is shown in this image? ...", "How many people ...", "The assistant gives ...".
    q1, q2, answer = (words_of(processor, n, at) for n, at in [(CHAT_QUESTION, 24), (CHAT_QUESTION, 159), (CHAT_ANSWER, 11)])

    def timed(fn):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - t0

    runs = []
    for r in range(repeats + 1):  # the first round warms up (fresh memory, kernels) and is not counted
        chat = ChatSession(model, processor, image=image)
        turn1 = timed(lambda: chat.ask(q1, max_new_tokens=1))
        prefill1 = chat.last_prefill_tokens
        chat.conversation[-1] = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        chat.prefill()
        turn2 = timed(lambda: chat.ask(q2, max_new_tokens=1))
        prompt = processor.apply_chat_template(chat.conversation[:-1], add_generation_prompt=True)
        inputs = {k: v.to(device) for k, v in processor(prompt, images=[image]).items()}
        scratch = timed(lambda: model.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=1))
        chat.close()
        if r:
            runs.append(dict(turn1_s=turn1, turn2_s=turn2, scratch_s=scratch, turn1_prefill=prefill1,
                             turn2_prefill=chat.last_prefill_tokens, turn2_prompt=inputs["input_ids"].shape[1]))
    med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    return med | {"turn2_over_turn1": med["turn2_s"] / med["turn1_s"], "turn2_over_scratch": med["turn2_s"] / med["scratch_s"],
                  "runs": runs}


def chat_table(r: dict, title: str) -> str:
    return "\n".join([
        f"| {title}: chat, time to first token | s | tokens prefilled |", "|---|---:|---:|",
        f"| turn 1: vision + system line, image, {CHAT_QUESTION}-token question | {r['turn1_s']:.3f} | {r['turn1_prefill']:.0f} |",
        f"| turn 2: {CHAT_QUESTION}-token question after a {CHAT_ANSWER}-token answer, ChatSession | {r['turn2_s']:.3f} | {r['turn2_prefill']:.0f} |",
        f"| turn 2 from scratch (vision + the whole prompt, as before sessions) | {r['scratch_s']:.3f} | {r['turn2_prompt']:.0f} |",
        f"\nturn 2 / turn 1: {r['turn2_over_turn1']:.3f}x; turn 2 / from scratch: {r['turn2_over_scratch']:.3f}x; "
        f"medians of {len(r['runs'])} round(s) in one process"])


# ---------------------------------------------------------------------------- the parent
def median(values) -> float:
    """The median of the measurements that came out (NaN: a decode difference lost to a busy machine)."""
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else float("nan")


def bench(preset: str, dtype: str, repeats: int, text_layers: int, cache_dir: Path, with_reference: bool,
          device: str = "cpu", compiled: bool = False, quantized: tuple = (), group_size: int = 128) -> dict:
    folder = checkpoint(preset, text_layers, cache_dir, device)
    config = json.loads((folder / "config.json").read_text())
    bw_bytes = 2**28 if preset == "tiny" else 2**30 if device == "cpu" else 2**32
    bandwidth = [read_bandwidth(bw_bytes, device)]  # before and after the runs
    quant_sides = [f"ours_{mode}" for mode in quantized]
    sides = ["ours"] + ["reference"] * with_reference + ["ours_compiled"] * compiled + quant_sides
    runs = {side: [] for side in sides}
    for r in range(repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:  # alternate who goes first: drift hits both
            print(f"round {r + 1}/{repeats}: {side} ({dtype})", file=sys.stderr, flush=True)
            runs[side].append(spawn("--worker", side, "--folder", folder, "--dtype", dtype, "--device", device,
                                    "--group-size", group_size))
            print(f"{side}: {json.dumps(runs[side][-1])}", file=sys.stderr, flush=True)
    bandwidth.append(read_bandwidth(bw_bytes, device))

    step_bytes = decode_bytes(config, 4 if dtype == "float32" else 2)
    bw = max(bandwidth)  # other processes on the machine can only make a measurement slower
    result = {"preset": preset, "dtype": dtype, "device": device, "text_layers": config["text_config"]["num_hidden_layers"]}
    for side in ("ours", "ours_compiled", "reference", *quant_sides):
        if side not in runs:
            result[side] = None
            continue
        med = {k: median(run[k] for run in runs[side]) for k in METRICS + ["weights_gb"]}
        # float sides: the formula's bytes (as before); quantized ones: what the loaded model's step reads
        side_bytes = runs[side][0]["decode_bytes_per_step"] if side in quant_sides else step_bytes
        med["decode_bytes_per_step"] = side_bytes
        med["decode_bound_tok_s"] = bw * 1e9 / side_bytes
        med["decode_bound_fraction"] = med["decode_tok_s_b1"] * side_bytes / (bw * 1e9)
        med["runs"] = runs[side]
        result[side] = med
    result["ratios"] = ratios(result["ours"], result["reference"])
    if compiled:
        result["ratios_compiled"] = ratios(result["ours_compiled"], result["reference"])
    else:
        del result["ours_compiled"]
    for side in quant_sides:  # quantized / ours in bfloat16: times (load, vision, prefill), GB, tokens/s
        result[f"ratios_{side.removeprefix('ours_')}"] = {
            name: result[side][key] / result["ours"][key] for name, key in QUANT_RATIOS.items()}
    if quant_sides:
        result["quantize"], result["group_size"] = list(quantized), group_size
        result["ours_decode_bytes_per_step_measured"] = runs["ours"][0].get("decode_bytes_per_step")
    result["cpu"] = cpu_flags() if device == "cpu" else None
    result["decode_bound_fraction"] = result["ours"]["decode_bound_fraction"]
    result["bandwidth_gb_s"] = bw
    result["decode_bytes_per_step"] = step_bytes
    result["decode_bound_tok_s"] = bw * 1e9 / step_bytes
    result["repeats"] = repeats
    return result


def ratios(ours: dict, ref: dict | None) -> dict:
    """ours / reference time; decode: ours / reference tokens/s (batch 1). None without a reference."""
    return {"load": ref and ours["load_s"] / ref["load_s"], "vision": ref and ours["vision_s"] / ref["vision_s"],
            "prefill": ref and ours["prefill_s"] / ref["prefill_s"],
            "decode": ref and ours["decode_tok_s_b1"] / ref["decode_tok_s_b1"]}


def table(r: dict) -> str:
    """The result as a markdown table."""
    quant = [("ours, " + (f"int4 g{r['group_size']}" if m == "int4" else m), f"ours_{m}", m) for m in r.get("quantize", [])]
    sides = [("ours", "ours")] + [("ours, compiled", "ours_compiled")] * ("ours_compiled" in r) + \
        [(name, side) for name, side, _ in quant] + [("transformers", "reference")]
    rows = [("load (s)", "load_s", "{:.2f}"), ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"),
            ("vision + projector, 1 image (s)", "vision_s", "{:.3f}"), ("prefill, image + 40 tokens (s)", "prefill_s", "{:.3f}"),
            ("decode batch 1 (tokens/s)", "decode_tok_s_b1", "{:.1f}"), ("decode batch 4 (tokens/s)", "decode_tok_s_b4", "{:.1f}"),
            ("decode batch 1 / bandwidth bound", "decode_bound_fraction", "{:.0%}")]
    if r["device"] != "cpu":
        rows.insert(2, ("peak GPU memory (GB)", "peak_gpu_gb", "{:.2f}"))
    title = f"{r['preset']} ({r['text_layers']} text layers), {r['dtype']}, {r['device']}"
    lines = [f"| {title} | " + " | ".join(name for name, _ in sides) + " | ours / transformers |"
             + "".join(f" {m} / ours |" for _, _, m in quant),
             "|---|" + "---:|" * (len(sides) + 1 + len(quant))]
    by_key = {v: k for k, v in QUANT_RATIOS.items()}
    for label, key, fmt in rows:
        values = [r[side][key] if r[side] else None for _, side in sides]
        a, b = values[0], values[-1]
        ratio = "" if b is None or key == "decode_bound_fraction" else f"{a / b:.2f}x"
        qratios = "".join(f" {r[f'ratios_{m}'][by_key[key]]:.2f}x |" if key in by_key else " |" for _, _, m in quant)
        lines.append(f"| {label} | " + " | ".join("" if v is None else fmt.format(v) for v in values) + f" | {ratio} |"
                     + qratios)
    lines.append(f"\nread bandwidth {r['bandwidth_gb_s']:.1f} GB/s; one decode step reads {r['decode_bytes_per_step'] / 1e9:.2f} GB "
                 f"of weights: bound {r['decode_bound_tok_s']:.1f} tokens/s; medians of {r['repeats']} run(s) per side")
    for name, side, _ in quant:
        lines.append(f"{name}: one decode step of the loaded model reads {r[side]['decode_bytes_per_step'] / 1e9:.3f} GB "
                     f"(bound {r[side]['decode_bound_tok_s']:.1f} tokens/s); weights {r[side]['weights_gb']:.2f} GB")
    if quant and r.get("ours_decode_bytes_per_step_measured"):
        lines.append(f"ours ({r['dtype']}), the same count on the loaded model: "
                     f"{r['ours_decode_bytes_per_step_measured'] / 1e9:.3f} GB")
    if r.get("cpu"):
        lines.append(r["cpu"])
    return "\n".join(lines)


def across_dtypes(results: list[dict]) -> str:
    """Ours in bfloat16 against ours in float32, when one run measured both."""
    by = {r["dtype"]: r["ours"] for r in results}
    if not {"float32", "bfloat16"} <= by.keys():
        return ""
    b, f = by["bfloat16"], by["float32"]
    return (f"ours, bfloat16 / float32: vision {b['vision_s'] / f['vision_s']:.2f}x, prefill {b['prefill_s'] / f['prefill_s']:.2f}x "
            f"(time); decode batch 1 {b['decode_tok_s_b1'] / f['decode_tok_s_b1']:.2f}x (tokens/s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["tiny", "7b-shaped"], default="7b-shaped")
    p.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"], default=["float32"],
                   help="one or more, measured one after the other")
    p.add_argument("--repeats", type=int, default=3, help="rounds of ours + reference; medians are reported")
    p.add_argument("--text-layers", type=int, default=2, help="decoder layers of the 7b-shaped preset (the real model: 32)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / ".cache")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compile", action="store_true", help="also measure ours with compile_decode() (for CUDA)")
    p.add_argument("--quantize", nargs="+", choices=["int8", "int4"], default=[],
                   help="also measure ours with quantize=MODE (one side per mode, in the bfloat16 run)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size (default 128; the tiny preset: 32, its text width is 64)")
    p.add_argument("--no-reference", action="store_true", help="measure ours only (ratios are null)")
    p.add_argument("--json", action="store_true", help="print one JSON object per dtype instead of tables")
    p.add_argument("--chat", action="store_true", help="instead: a ChatSession's time to first token, turn 2 vs turn 1 (ours only)")
    p.add_argument("--chat-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["ours", "ours_compiled", "reference", "ours_int8", "ours_int4"],
                   help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.group_size is None:
        args.group_size = 32 if args.preset == "tiny" else 128
    if args.quantize and "bfloat16" not in args.dtype and not args.worker:
        p.error("--quantize adds sides to the bfloat16 run: pass --dtype bfloat16 (with others if you like)")

    if args.chat_worker:
        print(json.dumps(chat_worker(args.folder, args.dtype[0], args.device, args.repeats)))
        return
    if args.chat:  # conversations: one worker per dtype, ours only
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        folder = checkpoint(args.preset, args.text_layers, args.cache_dir, args.device)
        for dtype in args.dtype:
            r = spawn("--chat-worker", "--folder", folder, "--dtype", dtype, "--device", args.device, "--repeats", args.repeats)
            text_layers = json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"]
            title = f"{args.preset} ({text_layers} text layers), {dtype}, {args.device}"
            print(json.dumps(r | {"preset": args.preset, "dtype": dtype}) if args.json else chat_table(r, title) + "\n", flush=True)
        return
    if args.worker:
        print(json.dumps(model_worker(args.worker, args.folder, args.dtype[0], args.device, args.group_size)))
        return
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for dtype in args.dtype:
        results.append(bench(args.preset, dtype, args.repeats, args.text_layers, args.cache_dir, not args.no_reference,
                             args.device, args.compile, tuple(args.quantize) if dtype == "bfloat16" else (),
                             args.group_size))
        print(json.dumps(results[-1]) if args.json else table(results[-1]) + "\n", flush=True)
    if not args.json and across_dtypes(results):
        print(across_dtypes(results))


if __name__ == "__main__":
    main()
