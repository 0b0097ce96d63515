"""Where does a GPU decode step go? Batch-1 decode tokens/s of the real-shaped 32-layer model, several ways.

    python benchmarks/decode_variants.py [--layers 32] [--dtype bfloat16]

No checkpoint: the model is drawn at random on the GPU. Every variant runs through `VipLlava.generate`
(greedy, 32 new tokens after the first, as bench.py times them) and is compared with the memory-bandwidth
bound of one step. Variants: eager kernels; `Llama.decode_step` captured by hand in one CUDA graph (no
compiler: what the launches cost); `compile_decode()` as shipped; and the same with inductor's
coordinate-descent tuning. torch.compile's reasons for skipping CUDA graphs are printed (perf hints).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tiny_checkpoint import TEXT_7B, VISION_7B  # noqa: E402
from vipllava import VipLlava, VipLlavaConfig  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import read_bandwidth, synchronize  # noqa: E402


class GraphStep:
    """Llama.decode_step captured once as a CUDA graph for fixed input buffers (the cache must stay put)."""

    def __init__(self, lm, B: int, max_len: int, device):
        self.inputs = [torch.zeros(B, 1, dtype=torch.long, device=device), torch.zeros(B, 1, dtype=torch.long, device=device),
                       torch.full((1,), max_len - 1, device=device), torch.zeros(B, 1, 1, max_len, dtype=torch.bool, device=device)]
        self.inputs[3][..., -1] = True  # warm-up and capture write and read the last slot only
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up off the main stream, as torch.cuda.graphs asks
            for _ in range(2):
                lm.decode_step(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = lm.decode_step(*self.inputs)

    def __call__(self, *args):
        for buf, a in zip(self.inputs, args):
            buf.copy_(a)
        self.graph.replay()
        return self.logits


def tokens_per_s(model, ids, n_new: int = 32) -> float:
    def timed(n):
        synchronize(ids.device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, eos_token_id=[])
        synchronize(ids.device)
        return time.perf_counter() - t0

    timed(n_new + 1)  # warm-up (and compile)
    first = timed(1)
    return n_new / (min(timed(n_new + 1) for _ in range(2)) - first)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script (no graph variant)")
    args = p.parse_args()
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    try:
        torch._logging.set_logs(perf_hints=True)  # e.g. "skipping cudagraphs due to ..."
    except Exception as e:
        print(f"(no perf hints: {e})")
    config = VipLlavaConfig.from_dict({"text_config": TEXT_7B | {"num_hidden_layers": args.layers},
                                       "vision_config": VISION_7B, "pad_token_id": 32001})
    with torch.device(device):
        model = VipLlava(config).to(dtype).eval().requires_grad_(False)
    lm = model.language_model
    ids = torch.randint(3, 30000, (1, 40), generator=torch.Generator().manual_seed(0)).to(device)

    bw = read_bandwidth(2**32 if device.type == "cuda" else 2**30, str(device)) * 1e9
    step_bytes = sum(p.numel() * p.element_size() for p in lm.parameters()) - lm.model.embed_tokens.weight.nbytes
    bound = bw / step_bytes
    print(f"read bandwidth {bw / 1e9:.0f} GB/s; {step_bytes / 1e9:.2f} GB per step: bound {bound:.1f} tokens/s", flush=True)

    def report(name, rate):
        print(f"| {name} | {rate:.1f} tokens/s | {rate / bound:.0%} of the bound |", flush=True)

    def graph_step():
        max_len = 256  # what generate's static path uses for 40 + 33 tokens
        lm.setup_cache(1, max_len)
        model.compiled_step = GraphStep(lm, 1, max_len, device)

    def compiled(tuning):
        def setup():
            torch._dynamo.reset()
            torch._inductor.config.coordinate_descent_tuning = tuning
            model.compile_decode()
        return setup

    variants = [("eager kernels", lambda: None), ("decode_step in one CUDA graph, no compiler", graph_step),
                ("compile_decode() as shipped", compiled(False)), ("compile_decode() + coordinate descent tuning", compiled(True))]
    for name, setup in variants if device.type == "cuda" else variants[:1] + variants[2:3]:
        t0 = time.perf_counter()
        try:
            setup()
            rate = tokens_per_s(model, ids)
        except Exception as e:  # one variant failing should not hide the others
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:300]} |", flush=True)
            continue
        report(f"{name} (set-up and timing {time.perf_counter() - t0:.0f} s)", rate)


if __name__ == "__main__":
    main()
