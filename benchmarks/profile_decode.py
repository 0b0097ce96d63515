"""Where one decode step's time goes: torch.profiler's top ops for ours, float or quantized.

    python benchmarks/profile_decode.py FOLDER [--quantize int8|int4] [--group-size 128] [--batch 1] [--steps 8]

Loads FOLDER (bfloat16), fills the KV cache with a 40-token prompt, warms up, then profiles --steps calls of
the language model's decode_step (one token per row, as generate's loop makes them) and prints the ops by
self CPU time, and the mean wall time of a step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--quantize", choices=["int8", "int4"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", type=int, default=25, help="rows of the table")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from vipllava import VipLlava

    model = VipLlava.from_pretrained(args.folder, dtype=torch.bfloat16, device="cpu", quantize=args.quantize,
                                     group_size=args.group_size, verbose=False)
    lm, B, T = model.language_model, args.batch, 40
    max_len = T + args.steps * 3 + 8
    ids = torch.randint(3, 300, (B, T), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        lm.setup_cache(B, max_len)
        lm(input_ids=ids)  # fills slots 0..T-1
        mask = torch.zeros(B, 1, 1, max_len, dtype=torch.bool)
        token = ids[:, -1:]

        def step(i):
            pos = T + i
            mask[..., :pos + 1] = True
            return lm.decode_step(token, torch.full((B, 1), pos), torch.tensor([pos]), mask)

        for i in range(args.steps):  # warm-up
            step(i)
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(args.steps + i)
        wall = (time.perf_counter() - t0) / args.steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.steps):
                step(2 * args.steps + i)
    kind = f"int4 g{args.group_size}" if args.quantize == "int4" else args.quantize or "bfloat16"
    print(f"{kind}, batch {B}: {wall * 1e3:.1f} ms per decode step ({B / wall:.1f} tokens/s) unprofiled, "
          f"mean of {args.steps}; torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
