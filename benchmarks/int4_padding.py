"""Int4 layers whose width is not whole blocks of the CPU layout (32 rows on AVX2, 64 on AVX-512): pad to the
block and run the kernel, or stay portable (dequantize the whole weight at each call)? Measured here, one process.

    python benchmarks/int4_padding.py [--k 4096] [--n 1056 4128 11040] [--rows 1 4]
"""
import argparse
import statistics
import time

import torch

import quantize as Q


def layer(n, k, packed):
    m = Q.Int4Linear(k, n, 128)
    m.load_state_dict(m.from_float(torch.randn(n, k, generator=torch.Generator().manual_seed(0))))
    if packed:
        m.pack()
    return m


def ms(m, x, repeats=20):
    with torch.inference_mode():
        m(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, nargs="+", default=[1056, 4128, 11040])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    block = Q.cpu_int4_block()
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, int4 block {block}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| N x K | rows | padded to | padded kernel ms | portable ms | portable / padded | "
          "whole-block N ms | padded / whole-block |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.n:
        padded, portable = layer(n, args.k, True), layer(n, args.k, False)
        whole = layer(n // block * block, args.k, True)
        for rows in args.rows:
            x = torch.randn(rows, args.k).to(torch.bfloat16)
            a, b, c = ms(padded, x), ms(portable, x), ms(whole, x)
            print(f"| {n} x {args.k} | {rows} | {-(-n // block) * block} | {a:.2f} | {b:.2f} | {b / a:.1f}x | "
                  f"{c:.2f} ({n // block * block}) | {a / c:.2f} |")


if __name__ == "__main__":
    main()
