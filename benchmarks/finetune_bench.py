"""One LoRA optimizer step, ours (finetune.py) against transformers + PEFT, on the same random checkpoint.

    python benchmarks/finetune_bench.py --preset 7b-shaped --dtype float32 bfloat16 [--text-layers 2] [--batch 2]
    python benchmarks/finetune_bench.py --device cuda --text-layers 32 --dtype bfloat16   # the real 7B shapes

Same weights, data, labels and LoRA settings on both sides (r 128, alpha 256, dropout 0.05 on q/k/v/o/gate/up/down
of the decoder, the projector trained in full, CLIP frozen; AdamW; gradient clipping at 1.0). A batch is `--batch`
samples of one image (576 positions) and 100 text tokens, the last 40 supervised. Each side runs in its own fresh
subprocess: load, one warm-up step, then `--steps` timed steps (the median is reported). Peak memory is the peak
resident memory (VmHWM) while training, its mark reset after loading (loading's own transient buffers are not
training's), and apart, training's part: that peak less the resident memory just before the first step; on CUDA,
the peak allocated GPU memory. tokens/s counts every token of the batch (image positions included).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench import checkpoint, peak_rss_bytes, synchronize  # noqa: E402  (the same cached checkpoints)

N_TEXT, N_SUPERVISED = 100, 40
R, ALPHA, DROPOUT = 128, 256, 0.05
METRICS = ["step_s", "tokens_per_s", "peak_rss_gb", "train_rss_gb", "peak_gpu_gb", "loss"]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets VmHWM to the current resident memory."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(side: str, folder: Path, dtype_name: str, device: str, batch: int, steps: int, checkpointing: bool) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    dtype = getattr(torch, dtype_name)
    config = json.loads((folder / "config.json").read_text())
    image_token, image_seq = config["image_token_index"], config["image_seq_length"]
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 300, (batch, N_TEXT), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), text[:, :20], torch.full((batch, image_seq), image_token),
                     text[:, 20:]], dim=1).to(device)  # (B, T)
    labels = torch.full_like(ids, -100)
    labels[:, -N_SUPERVISED:] = ids[:, -N_SUPERVISED:]
    mask = torch.ones_like(ids)
    px = torch.randn(batch, 3, 336, 336, generator=g).to(device, dtype)
    torch.manual_seed(0)

    if side == "ours":
        import finetune
        import lora
        from vipllava import VipLlava

        model = VipLlava.from_pretrained(folder, dtype=dtype, device=device, verbose=False)
        groups = finetune.prepare_model(model, lora.LoraConfig(R, ALPHA, DROPOUT), checkpointing)
        optimizer = torch.optim.AdamW([{"params": groups["lora"], "lr": 2e-4},
                                       {"params": groups["projector"], "lr": 2e-5}], weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        micro = {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": px}
        model.train()

        def step():
            return finetune.train_step(model, [micro], optimizer, scheduler)[0]
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import VipLlavaForConditionalGeneration

        import lora

        placed = {} if device == "cpu" else {"device_map": device}
        model = VipLlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, **placed)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                 target_modules=lora.TARGET_REGEX,
                                                 modules_to_save=["multi_modal_projector"]))
        trainable = [p for p in model.parameters() if p.requires_grad]
        lora_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        projector = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
        optimizer = torch.optim.AdamW([{"params": lora_params, "lr": 2e-4}, {"params": projector, "lr": 2e-5}],
                                      weight_decay=0.0)
        model.train()

        def step():
            loss = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    loaded_rss = rss_bytes()
    reset_peak_rss()
    step()  # warm-up: allocator, threads, the optimizer's state
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = peak_rss_bytes()
    return {"step_s": step_s, "tokens_per_s": ids.numel() / step_s, "peak_rss_gb": peak / 1e9,
            "train_rss_gb": (peak - loaded_rss) / 1e9, "loss": loss,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else 0.0}


def spawn(*args) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict, title: str) -> str:
    ours, ref = results["ours"], results["peft"]
    lines = [f"| {title} | ours | transformers + PEFT | ours / theirs |", "| --- | --- | --- | --- |"]
    for m in METRICS:
        if m == "peak_gpu_gb" and not ref[m]:
            continue
        ratio = "" if m == "loss" else f"{ours[m] / ref[m]:.2f}x" if ref[m] else ""
        lines.append(f"| {m} | {ours[m]:.4g} | {ref[m]:.4g} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="7b-shaped", choices=["tiny", "7b-shaped"])
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing on both sides")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / ".cache")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        side, folder, dtype, device, batch, steps, ckpt = args.worker
        print(json.dumps(worker(side, Path(folder), dtype, device, int(batch), int(steps), ckpt == "1")))
        return
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    folder = checkpoint(args.preset, args.text_layers, args.cache_dir, args.device)
    for dtype in args.dtype:
        results = {side: spawn(side, folder, dtype, args.device, args.batch, args.steps, int(args.checkpointing))
                   for side in ("ours", "peft")}
        title = (f"{args.preset} ({args.text_layers} text layers), {dtype}, {args.device}, batch {args.batch}, "
                 f"r {R}" + (", checkpointing" if args.checkpointing else ""))
        print(json.dumps(results) if args.json else table(results, title) + "\n", flush=True)


if __name__ == "__main__":
    main()
