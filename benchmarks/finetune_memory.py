"""Peak memory of one fine-tuning step, QLoRA (int4 / int8 base) against LoRA over the bf16 base, 7b-shaped,
and what merging an adapter into a quantized base costs.

    python benchmarks/finetune_memory.py [--text-layers 2 4] [--rank 16] [--cache-dir benchmarks/.cache]
    python benchmarks/finetune_memory.py --merge-error [--text-layers 2]

Each configuration runs in a fresh subprocess: load the base (VipLlava.from_pretrained, quantize=...), add LoRA
on q/k/v/o/gate/up/down and train the projector (finetune.prepare_model), activation checkpointing on, then one
AdamW step (finetune.train_step) on one marked-image sample: 576 image tokens and 160 text tokens, the last 64
supervised. Reported: the peak resident memory (VmHWM) after loading and after the step, and the step's seconds.
Per decoder layer: the difference between the runs with two layer counts, divided by the layers between them;
the real 32 layers are extrapolated from it (32-layer peak = peak(L) + (32 - L) x per layer).

--merge-error: a random adapter (B drawn so that each update B A alpha/r has 2% of its weight's RMS) over the
float32 base is the reference; the same adapter unmerged over the int8/int4 base, and merged into it (each layer
re-quantized with the update in it), are compared with it on the logits of the same marked-image prompt.

transformers + PEFT + bitsandbytes is not measured: bitsandbytes is not installed here (its CPU backend is
separate from the CUDA one), and it is no dependency of this project.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIGS = {"LoRA, bf16 base": dict(quantize=None), "QLoRA, int8 base": dict(quantize="int8"),
           "QLoRA, int4 base": dict(quantize="int4")}


def sample(model, text_before=16, text_after=144, supervised=64, seed=0):
    """One right-sized batch: <s>, text, 576 <image> ids, text; the last `supervised` tokens labelled."""
    import torch

    c = model.config
    g = torch.Generator().manual_seed(seed)
    vocab, image = c.text_config.vocab_size, c.image_token_index
    ids = torch.cat([torch.tensor([1]), torch.randint(3, image, (text_before,), generator=g),
                     torch.full((c.image_seq_length,), image), torch.randint(3, image, (text_after,), generator=g)])
    ids = ids.clamp(max=vocab - 1)
    labels = torch.full_like(ids, -100)
    labels[-supervised:] = ids[-supervised:]
    size = c.vision_config.image_size
    return {"id": "bench", "input_ids": ids, "labels": labels,
            "pixel_values": torch.randn(3, size, size, generator=g)}


def step_worker(folder: Path, quantize: str | None, rank: int) -> dict:
    import torch

    import finetune
    import lora
    from bench import peak_rss_bytes
    from vipllava import VipLlava

    torch.manual_seed(0)
    model = VipLlava.from_pretrained(folder, dtype=torch.bfloat16, quantize=quantize, verbose=False)
    loaded = peak_rss_bytes()
    groups = finetune.prepare_model(model, lora.LoraConfig(rank, 2 * rank, 0.05), checkpointing=True)
    optimizer = torch.optim.AdamW([{"params": groups["lora"], "lr": 2e-4},
                                   {"params": groups["projector"], "lr": 2e-5}], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    batch = finetune.collate([sample(model)], 0)
    model.train()
    t0 = time.perf_counter()
    loss, n = finetune.train_step(model, [batch], optimizer, scheduler)
    seconds = time.perf_counter() - t0
    trainable = sum(p.numel() for g in groups.values() for p in g)
    return {"loaded_gb": loaded / 1e9, "peak_gb": peak_rss_bytes() / 1e9, "step_s": seconds, "loss": loss,
            "trainable_m": trainable / 1e6, "tokens": int(batch["attention_mask"].sum())}


def merge_worker(folder: Path, rank: int) -> dict:
    import tempfile

    import torch

    import finetune
    import lora
    from vipllava import VipLlava

    torch.manual_seed(0)
    config = lora.LoraConfig(rank, 2 * rank, 0.0)
    reference = VipLlava.from_pretrained(folder, dtype=torch.float32, verbose=False)
    finetune.prepare_model(reference, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora.lora_modules(reference).values():  # an update with 2% of the weight's RMS
            b = torch.randn(m.lora_B.weight.shape, generator=g)
            delta = (b @ m.lora_A.weight) * m.scaling
            b *= 0.02 * m.base_layer.weight.float().pow(2).mean().sqrt() / delta.pow(2).mean().sqrt()
            m.lora_B.weight.copy_(b)
    batch = finetune.collate([sample(reference)], 0)
    inputs = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])

    def logits(model):
        with torch.no_grad():
            return model.eval()(*inputs).logits.float()

    want = logits(reference)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        lora.save_adapter(reference, config, tmp)
        del reference
        for mode in ("int8", "int4"):
            for merge in (False, True):
                model = VipLlava.from_pretrained(folder, dtype=torch.float32, quantize=mode, verbose=False,
                                                 adapter=tmp, merge=merge)
                got = logits(model)
                del model
                out[f"{mode}, {'merged' if merge else 'unmerged'}"] = {
                    "rel_rms": float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()),
                    "max_abs": float((got - want).abs().max()),
                    "top1_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean())}
    return out


def run_worker(*args) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(args)], capture_output=True, text=True,
                       cwd=ROOT)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text-layers", type=int, nargs="+", default=[2, 4], help="decoder layer counts to measure")
    p.add_argument("--rank", type=int, default=16, help="LoRA r (alpha 2r)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / ".cache")
    p.add_argument("--merge-error", action="store_true", help="measure merging into a quantized base instead")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, *args = json.loads(a.worker)
        folder = Path(args[0])
        result = step_worker(folder, args[1], args[2]) if kind == "step" else merge_worker(folder, args[1])
        print(json.dumps(result))
        return
    from bench import checkpoint

    if a.merge_error:
        folder = checkpoint("7b-shaped", a.text_layers[0], a.cache_dir)
        result = run_worker("merge", str(folder), a.rank)
        print(f"\n7b-shaped ({a.text_layers[0]} text layers), LoRA r={a.rank} with updates of 2% of each weight's RMS, "
              f"logits against the float32 base + unmerged LoRA\n\n| base, adapter | relative RMS error | "
              f"max abs error | top-1 agreement |\n|---|---:|---:|---:|")
        for name, r in result.items():
            print(f"| {name} | {r['rel_rms']:.4f} | {r['max_abs']:.3f} | {100 * r['top1_agree']:.1f}% |")
        return
    results = {}
    for layers in a.text_layers:
        folder = checkpoint("7b-shaped", layers, a.cache_dir)
        for name, c in CONFIGS.items():
            results[(name, layers)] = r = run_worker("step", str(folder), c["quantize"], a.rank)
            print(f"{name}, {layers} layers: {json.dumps(r)}", file=sys.stderr, flush=True)
    lo, hi = min(a.text_layers), max(a.text_layers)
    print(f"\n7b-shaped, one step, LoRA r={a.rank} (alpha {2 * a.rank}) on q/k/v/o/gate/up/down + the projector, "
          f"activation checkpointing, {results[(next(iter(CONFIGS)), lo)]['tokens']} tokens, CPU\n")
    print(f"| base | loaded, {lo} layers (GB) | step peak, {lo} layers (GB) | step peak, {hi} layers (GB) | "
          f"per layer (GB) | 32 layers, extrapolated (GB) | step, {lo} layers (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in CONFIGS:
        low, high = results[(name, lo)], results[(name, hi)]
        per_layer = (high["peak_gb"] - low["peak_gb"]) / (hi - lo) if hi > lo else float("nan")
        print(f"| {name} | {low['loaded_gb']:.2f} | {low['peak_gb']:.2f} | {high['peak_gb']:.2f} | {per_layer:.3f} | "
              f"{low['peak_gb'] + (32 - lo) * per_layer:.1f} | {low['step_s']:.1f} |")


if __name__ == "__main__":
    main()
