"""How a matrix product is made fast, in one place: the CPU paths of the float `Linear` every model file uses,
and the weight-only int8 / int4 layers `VipLlava.from_pretrained(quantize=...)` puts in the language model.

Which path runs where (x: the activations, `rows` = x.numel() // in_features). Measured: one 11008 x 4096
weight on the 2-core AVX2 EPYC, torch 2.13, medians; the benchmark tables are in README.md.

| layer | device | rows | path | measured |
| --- | --- | --- | --- | --- |
| Linear, float32 | CPU | 1 | the weight's rows split between threads (MKL runs one row on one core) | 8.5 ms |
| Linear, float32 | CPU | 2-16; a wide layer on AVX-512 | (W @ x^T)^T: MKL is 2-4x faster for a few rows | |
| Linear, bf16 | AVX-512 CPU | 1 | `torch.mv`: torch's gemv reads the weight faster than oneDNN | 6.3 ms, not 7.8 (*) |
| Linear, bf16/fp16 | CPU without fast kernels for them | > 8 | in float32, the weight converted in pieces | 16 rows: 55 ms, not 99 |
| Int8Linear | CPU | <= 16 | `aten._weight_int8pack_mm`, bf16 activations (the only vectorized dtype) | 1 row 3.4 ms, 4 rows 5.5 |
| Int4Linear | CPU | <= 16 | `aten._weight_int4pack_mm_for_cpu`, bf16 activations, packed for this CPU | 1 row 3.7 ms, 4 rows 6.4 |
| Int8/Int4Linear | CPU | > 16 | dequantized in pieces to float32 (or bf16 with fast kernels), then MKL | as float32 |
| Int8Linear | CUDA, MPS | any | `F.linear(x, q.to(x.dtype)) * scales`: torch.compile fuses it (aten's int8 CUDA op is naive) | |
| Int4Linear | CUDA sm80+ | any | `aten._weight_int4pack_mm` (tinygemm), bf16 | |
| any quantized | elsewhere | any | dequantize the whole weight, then F.linear: always correct, slowest | |

(*) CPU time on one thread of the AVX-512 Xeon, see bf16_gemv.
(bf16 `F.linear`, for comparison: 1 row 7.5 ms, 4 rows 27 ms.) Splitting the quantized kernels' rows between
threads as float32 does gained nothing (they use every thread already); the int4 kernel unpacks nibbles
slower than memory delivers them on AVX2, so it is not faster than int8 there - only smaller.

The formulas are gpt-fast's and torchao's (the tests check ours against torchao):
int8: one scale per output channel, s = max|w| / 127.5, q = clamp(round(w / s), -128, 127), w ~ q * s.
int4: per group of g inputs, s = (max - min) / 15, z = min + 8 s, q = clamp(round((w - (z - 8 s)) / s), 0, 15),
w ~ (q - 8) * s + z (tinygemm's convention: the zero point is a float, so no value needs to be representable).
On disk both are portable (int8 (N, K); int4 two nibbles per byte, (N, K/2), high nibble first) and packed for
the device when loaded: the CPU int4 kernel's layout depends on the CPU's instruction set (blocks of 32 rows with
AVX2, 64 with AVX-512). A width that is not whole blocks is padded with rows of weight 0, cut from the output:
on the AVX-512 Xeon, 1056 x 4096 at 1 row takes 0.14 ms padded against 12.5 ms dequantizing the whole weight
(`python benchmarks/int4_padding.py`), and the same as the 1024-row layer below it.
"""
from __future__ import annotations

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F

FEW_ROWS = 16  # up to this many rows a product is a decode step: reading the weight is the cost
MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept
DEFAULT_GROUP_SIZE = 128


# ---------------------------------------------------------------------------- float Linear, CPU paths
@functools.cache
def cpu_computes(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices at full speed. oneDNN's bf16 kernels need AVX-512 (fp16:
    AVX-512-FP16 or AMX); without them a bf16 product of many rows runs several times slower than in float32."""
    if dtype == torch.float32:
        return True
    supported = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    return torch.backends.mkldnn.is_available() and getattr(torch.ops.mkldnn, supported[dtype])()


@functools.cache
def cpu_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(torch.get_num_threads())


@functools.cache
def avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@functools.cache
def bf16_gemv() -> bool:
    """Whether one bf16 row is multiplied by torch.mv (torch's own gemv kernel, both threads) instead of F.linear
    (oneDNN's GEMM). Measured with the weights of one 7B decoder layer, CPU seconds on one thread: 1.45x the
    weights per second on AVX-512 (13.4 against 9.3 GB/s), the same on AVX2 (7.5 against 7.4, torch's and
    oneDNN's AVX2 code on the same Xeon), so AVX-512 only. Not fp16: its torch.mv is 2x slower than F.linear."""
    return avx512()


def rows_of(x) -> int:
    return x.numel() // x.shape[-1]


def fast_path(x) -> bool:
    """Whether to take a CPU path of ours (not under torch.compile, which makes its own)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class Linear(nn.Linear):
    """nn.Linear with CPU paths, measured on 2-core machines (AVX-512 Xeon and AVX2 EPYC, PyTorch's MKL):

    - float32, one row (decode at batch 1): MKL multiplies a single row on one core, reading ~22 GB/s of
      weights; the weight's rows split between the CPU's threads read 25-33 GB/s, near the machine's bound;
    - bf16, one row, on AVX-512: torch.mv, 1.45x faster than F.linear there (see bf16_gemv);
    - float32, 2-16 rows, and wide layers: (W @ x^T)^T, where MKL is faster: 2-4x for 2-16 rows, and a few
      percent for the 616 rows of a prefill through the text layers on the AVX-512 Xeon only - on the AVX2
      EPYC it is 9% slower there (4096 x 4096: 203 against 186 ms), so wide layers take F.linear on AVX2;
    - bf16/fp16 with many rows (prefill, the vision tower) on a CPU without fast kernels for them (see
      cpu_computes) run in float32: 616 rows x (4096 -> 11008) take 5.4 s in bf16 on AVX2, 0.4 s in fp32.
      Up to 8 rows stay in bf16: converting the weight costs ~26 ms per 4096 x 11008 on AVX2, while bf16 costs
      6.2 ms per row there (8 rows: 49.5 against 53.8 ms; 16 rows: 99 against 55 ms).
    """
    def forward(self, x):  # (..., C_in) -> (..., C_out)
        if not fast_path(x):
            return F.linear(x, self.weight, self.bias)
        rows = rows_of(x)
        if x.dtype == torch.float32:
            if rows == 1 and torch.get_num_threads() > 1:
                return split_between_threads(lambda w: F.linear(x, w), self.weight, self.bias)
            if 1 < rows <= FEW_ROWS or (min(self.weight.shape) >= 4096 and avx512()):
                return self.transposed(x, rows)
        elif rows == 1 and x.dtype == torch.bfloat16 and bf16_gemv():
            y = torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)  # (..., C_out)
            return y if self.bias is None else y + self.bias
        elif rows > 8 and not cpu_computes(x.dtype):
            return in_pieces(x, self.out_features, lambda rows: self.weight[rows], self.bias)
        return F.linear(x, self.weight, self.bias)

    def transposed(self, x, rows: int):
        xt = x.reshape(rows, -1).t()  # (C_in, rows)
        y = self.weight @ xt if self.bias is None else torch.addmm(self.bias[:, None], self.weight, xt)  # (C_out, rows)
        return y.t().contiguous().view(*x.shape[:-1], -1)


def split_between_threads(product, weight, bias=None):
    """product(piece) for pieces of the weight's rows on the CPU's threads (ops release the GIL), concatenated."""
    grad = torch.is_grad_enabled()  # grad mode (and inference mode) are per thread: carry the caller's over

    def part(w):
        with torch.set_grad_enabled(grad):
            return product(w)

    pieces = weight.split(-(-weight.shape[0] // torch.get_num_threads()))
    y = torch.cat(list(cpu_threads().map(part, pieces)), dim=-1)
    return y if bias is None else y + bias


def in_pieces(x, out_features: int, piece, bias=None, multiple: int = 64):
    """F.linear(x, W) with W made piece by piece: piece(rows) gives W[rows] (a slice) in any float dtype.

    In float32, or x's dtype where the CPU computes it fast. 4M weights at a time: a fresh 180 MB float32
    copy of a whole weight costs 6x the conversion in page faults, while pieces this small reuse the same
    memory from call to call. `multiple`: pieces start at multiples of it (the int4 CPU layout's blocks).
    """
    dtype = x.dtype if cpu_computes(x.dtype) else torch.float32
    xc = x.to(dtype)
    step = max(multiple, 2**22 // x.shape[-1] // multiple * multiple)
    y = torch.cat([F.linear(xc, piece(slice(i, i + step)).to(dtype)) for i in range(0, out_features, step)], dim=-1)
    return (y if bias is None else y + bias.to(dtype)).to(x.dtype)


def rows_in_chunks(w: torch.Tensor, fn, step_elements: int = 2**20):
    """fn over pieces of w's rows, written into outputs allocated once at their full size: quantizing then
    needs a few small float32 temporaries, the same size each time, instead of several copies of the weight
    (a loop of big temporaries of varying sizes fragments the heap: loads grew 2x the weights' size)."""
    step = max(1, step_elements // w.shape[1])
    outs = None
    for i in range(0, w.shape[0], step):
        parts = fn(w[i:i + step])
        if outs is None:
            outs = tuple(torch.empty((w.shape[0], *p.shape[1:]), dtype=p.dtype) for p in parts)
        for out, p in zip(outs, parts):
            out[i:i + step] = p
    return outs


# ---------------------------------------------------------------------------- training over a frozen quantized base
class FrozenProduct(torch.autograd.Function):
    """A quantized layer's product where the input needs a gradient (QLoRA: adapters trained over an int8/int4
    base). Forward: the inference paths as they are. Backward: dx = dy @ W, W dequantized a piece of rows at a time
    (pieces start at multiples of 64, the int4 CPU layout's blocks), so no float copy of a weight is saved for
    backward or outlives its piece. The quantized weight is frozen: it gets no gradient."""

    @staticmethod
    def forward(ctx, x, layer):  # runs without grad: layer(x) takes its inference path
        ctx.layer = layer
        return layer(x)

    @staticmethod
    def backward(ctx, dy):  # dy (..., N) -> dx (..., K)
        layer = ctx.layer
        dtype = dy.dtype if dy.device.type != "cpu" or cpu_computes(dy.dtype) else torch.float32
        dyc, dx = dy.to(dtype), None
        step = max(64, 2**22 // layer.in_features // 64 * 64)
        for i in range(0, layer.out_features, step):
            part = dyc[..., i:i + step] @ layer.dequantize(slice(i, i + step)).to(dtype)  # (..., K)
            dx = part if dx is None else dx.add_(part)
        return dx.to(dy.dtype), None


def frozen_product(layer, x):
    """layer(x) through FrozenProduct when x needs a gradient; the quantized base (and its bias) stays frozen."""
    if layer.bias is not None and layer.bias.requires_grad:
        raise ValueError("a quantized layer's bias cannot be trained: freeze it (requires_grad_(False)), or train "
                         "over the float model")
    return FrozenProduct.apply(x, layer)


# ---------------------------------------------------------------------------- int8
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 q (N, K) and float32 scales (N,), symmetric per output channel."""
    def part(w):  # in place on one float32 copy of the piece: the only temporary
        w = w.to(torch.float32, copy=True)
        lo, hi = torch.aminmax(w, dim=1)
        scales = (torch.maximum(-lo, hi) / 127.5).clamp(min=torch.finfo(torch.float32).smallest_normal)  # (n,)
        return w.mul_((1.0 / scales)[:, None]).round_().clamp_(-128, 127).to(torch.int8), scales

    return rows_in_chunks(w, part)


class Int8Linear(nn.Module):
    """y = x @ (q * s)^T + b: int8 weights (out, in), one float32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.register_buffer("scales_bf16", None, persistent=False)  # for the CPU kernel, made by pack()

    def from_float(self, w) -> dict:
        q, scales = quantize_int8(w)
        return {"weight": q, "scales": scales}

    def pack(self):
        """Get ready for the weight's device. torch 2.13's CPU kernel silently gives wrong numbers unless the
        width is a multiple of 16 (and wants bf16 scales): other widths take the dequantizing path."""
        if self.weight.device.type == "cpu" and self.in_features % 16 == 0:
            self.scales_bf16 = self.scales.to(torch.bfloat16)

    def dequantize(self, rows=slice(None)):  # (n, K) float32
        return self.weight[rows].float() * self.scales[rows, None]

    def portable(self) -> dict:
        return {"weight": self.weight, "scales": self.scales}

    def forward(self, x):  # (..., K) -> (..., N)
        if torch.is_grad_enabled() and x.requires_grad:
            return frozen_product(self, x)
        if fast_path(x) and self.scales_bf16 is not None:
            if rows_of(x) > FEW_ROWS:
                return in_pieces(x, self.out_features, self.dequantize, self.bias)
            xb = x.reshape(-1, self.in_features).to(torch.bfloat16, copy=True)  # a fresh copy: aligned rows
            y = torch.ops.aten._weight_int8pack_mm(xb, self.weight, self.scales_bf16).to(x.dtype)  # (rows, N)
            y = y.view(*x.shape[:-1], -1)
        elif x.device.type == "cpu":
            y = F.linear(x, self.dequantize().to(x.dtype))
        else:  # one kernel under torch.compile: the int8 weight is read once, converted in registers
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


# ---------------------------------------------------------------------------- int4
def check_group_size(group_size: int, in_features: int | None = None):
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not supported: use one of {GROUP_SIZES} (128 is the default)")
    if in_features is not None and in_features % group_size:
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f"use group size {max(fits)} (--group-size {max(fits)}, or group_size={max(fits)} in Python)" \
            if fits else "quantize this model to int8"
        raise ValueError(f"int4 group size {group_size} does not divide a layer width of {in_features}: {hint}")


def choose_group_size(widths, group_size: int | None = None) -> int:
    """The int4 group size for layers with these input widths: the one asked for (checked against each), or for
    None the default 128 where it divides them all, else the largest that does (small models, e.g. 64 wide)."""
    if group_size is None:
        fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
        group_size = DEFAULT_GROUP_SIZE if DEFAULT_GROUP_SIZE in fits else max(fits, default=DEFAULT_GROUP_SIZE)
    for width in sorted(widths):
        check_group_size(group_size, width)
    return group_size


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K/2) uint8 (two values per byte, high nibble first), bf16 scales and zeros (N, K/g)."""
    check_group_size(group_size, w.shape[1])

    def part(w):
        n, k = w.shape
        g = w.to(torch.float32, copy=True).view(n, k // group_size, group_size)  # one copy, then in place
        lo, hi = torch.aminmax(g, dim=-1)  # (n, K/g)
        scales = ((hi - lo) / 15).clamp(min=1e-6)
        zeros = (lo + scales * 8).to(torch.bfloat16)  # torchao's order: the zero from the unrounded scale
        scales = scales.to(torch.bfloat16)
        low = zeros - scales * 8  # in bf16, as torchao computes it, so that q comes out identical
        q = g.sub_(low[..., None]).div_(scales[..., None]).round_().clamp_(0, 15).to(torch.uint8).view(n, k)
        return q[:, 0::2] << 4 | q[:, 1::2], scales, zeros

    return rows_in_chunks(w, part)


def unpack_nibbles(packed):  # (N, K/2) uint8, high nibble first -> (N, K) values 0..15
    q = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8, device=packed.device)
    torch.bitwise_right_shift(packed, 4, out=q[:, 0::2])
    torch.bitwise_and(packed, 15, out=q[:, 1::2])
    return q


# The CPU kernel's layout, for the N rows in blocks of B (32 with AVX2, 64 with AVX-512): for each column k,
# B/2 bytes; byte i holds row i of the block in its low nibble and row B/2 + i in its high one.
def pack_for_cpu(q, block: int):  # (N, K) uint8 values -> (N, K/2) uint8
    N, K = q.shape
    v = q.view(N // block, 2, block // 32, 16, K)
    b = v[:, 1] << 4
    return b.bitwise_or_(v[:, 0]).permute(0, 3, 1, 2).reshape(N, K // 2)


def unpack_for_cpu(packed, block: int):  # the inverse of pack_for_cpu
    N, K = packed.shape[0], packed.shape[1] * 2
    b = packed.reshape(N // block, K, block // 32, 16).permute(0, 2, 3, 1)  # (N/B, B/32, 16, K)
    return torch.stack([b & 15, b >> 4], dim=1).reshape(N, K)


@functools.cache
def cpu_int4_block() -> int | None:
    """The block of the CPU int4 kernel's layout on this CPU, found by packing a probe with torch's op and
    comparing; None where there is no such op or its layout is not one we know (then int4 dequantizes)."""
    q = torch.randint(0, 16, (64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except (AttributeError, RuntimeError):
        return None
    return next((b for b in (32, 64) if torch.equal(pack_for_cpu(q.to(torch.uint8), b), packed)), None)


def cuda_int4(device: torch.device) -> bool:
    """Whether tinygemm's int4 kernel runs here: CUDA (not ROCm), compute capability 8.0 or newer."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0)


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W = (q - 8) * s + z, q in 0..15, one bf16 scale and zero per group of inputs.

    `layout` says what `weight` holds: "portable" (as saved: (N, K/2), high nibble first), "cpu" (the CPU
    kernel's blocks, same shape) or "cuda" (tinygemm's tiles); pack() turns portable into the device's.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False):
        super().__init__()
        check_group_size(group_size, in_features)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size, dtype=torch.bfloat16))
        self.register_buffer("zeros", torch.empty(out_features, in_features // group_size, dtype=torch.bfloat16))
        self.register_buffer("scales_and_zeros", None)  # (K/g, N, 2): what the kernels take, made by pack()
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.layout = "portable"

    def from_float(self, w) -> dict:
        q, scales, zeros = quantize_int4(w, self.group_size)
        return {"weight": q, "scales": scales, "zeros": zeros}

    def pack(self):
        """Repack the portable weight for the device it is on, where a kernel exists (else it stays portable)."""
        device, N = self.weight.device, self.out_features
        block = cpu_int4_block() if device.type == "cpu" else None
        pad = -N % (block or 1)  # the CPU layout is whole blocks of rows: pad with rows of weight 0, cut from y
        if block:
            q = pack_for_cpu(F.pad(unpack_nibbles(self.weight), (0, 0, 0, pad), value=8), block)
            # into the same bytes: a new tensor per layer, freed and reallocated, grows the heap at each layer
            self.weight, self.layout = (self.weight.copy_(q) if pad == 0 else q.contiguous()), "cpu"
        elif cuda_int4(device) and N % 8 == 0 and self.in_features % 128 == 0:
            self.weight, self.layout = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), 8), "cuda"
        else:
            return
        sz = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1)  # (K/g, N, 2); scale 0, zero 0 in pads
        self.scales_and_zeros = F.pad(sz, (0, 0, 0, pad)).contiguous()
        self.scales = self.zeros = None

    def scale_zero(self, rows=slice(None)):  # (n, K/g) float32 each
        if self.layout == "portable":
            return self.scales[rows].float(), self.zeros[rows].float()
        sz = self.scales_and_zeros[:, slice(*rows.indices(self.out_features))].float()  # never the padding rows
        return sz[..., 0].t(), sz[..., 1].t()

    def values(self, rows=slice(None)):  # q (n, K) uint8; rows a slice at multiples of 64 in the "cpu" layout
        if self.layout == "portable":
            return unpack_nibbles(self.weight[rows])
        if self.layout == "cpu":  # unpack whole blocks, then cut off the padding rows of the last one
            (start, stop, _), block = rows.indices(self.out_features), cpu_int4_block()
            return unpack_for_cpu(self.weight[start:-(-stop // block) * block], block)[:stop - start]
        # tinygemm's tiles: read q back through the kernel itself, with scale 1 and zero 8 (w = q exactly)
        K, g = self.in_features, self.group_size
        unit = torch.ones(K // g, self.out_features, 2, dtype=torch.bfloat16, device=self.weight.device)
        unit[..., 1] = 8
        eye = torch.eye(K, dtype=torch.bfloat16, device=self.weight.device)
        q = torch.cat([torch.ops.aten._weight_int4pack_mm(e, self.weight, g, unit) for e in eye.split(1024)])
        return q.t()[rows].round().to(torch.uint8)

    def dequantize(self, rows=slice(None)):  # (n, K) float32
        q, (s, z) = self.values(rows), self.scale_zero(rows)
        n, g = q.shape[0], self.group_size
        return ((q.view(n, -1, g).float() - 8) * s[..., None] + z[..., None]).view(n, -1)

    def portable(self) -> dict:
        if self.layout == "portable":
            return {"weight": self.weight, "scales": self.scales, "zeros": self.zeros}
        q = self.values()
        s, z = (t.to(torch.bfloat16) for t in self.scale_zero())
        return {"weight": q[:, 0::2] << 4 | q[:, 1::2], "scales": s.contiguous(), "zeros": z.contiguous()}

    def unpack(self):
        """Back to the portable layout (for saving), in the weight's own bytes where the shapes allow."""
        if self.layout == "portable":
            return
        p = self.portable()
        self.weight = self.weight.copy_(p["weight"]) if self.weight.shape == p["weight"].shape else p["weight"]
        self.scales, self.zeros, self.scales_and_zeros, self.layout = p["scales"], p["zeros"], None, "portable"

    def forward(self, x):  # (..., K) -> (..., N)
        if torch.is_grad_enabled() and x.requires_grad:
            return frozen_product(self, x)
        on_cpu_kernel = self.layout == "cpu" and fast_path(x)
        if on_cpu_kernel and rows_of(x) > FEW_ROWS:
            return in_pieces(x, self.out_features, self.dequantize, self.bias)
        if on_cpu_kernel or self.layout == "cuda":
            kernel = torch.ops.aten._weight_int4pack_mm_for_cpu if on_cpu_kernel else torch.ops.aten._weight_int4pack_mm
            xb = x.reshape(-1, self.in_features).to(torch.bfloat16, copy=True)  # a fresh copy: aligned rows
            y = kernel(xb, self.weight, self.group_size, self.scales_and_zeros)[:, :self.out_features]
            y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)


# ---------------------------------------------------------------------------- the model
QUANTIZED = (Int8Linear, Int4Linear)


def quantize_language_model(lm: nn.Module, mode: str, group_size: int = 128):
    """Swap the Linears of `lm` (7 per decoder layer, and lm_head) for quantized ones, before loading (on meta).

    lm_head stays int8 in int4 mode too: it is one matrix (131 M weights in the 7B) that every token's
    probabilities come straight out of, and 4 bits there cost more accuracy than the 65 MB they save.
    """
    check_mode(mode)
    for name, m in list(lm.named_modules()):
        if isinstance(m, nn.Linear):
            bias = m.bias is not None
            new = Int4Linear(m.in_features, m.out_features, group_size, bias) if mode == "int4" and name != "lm_head" \
                else Int8Linear(m.in_features, m.out_features, bias)
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent), child, new)
    return lm


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"unknown quantize value {mode!r}: use None (no quantization), 'int8' or 'int4'")


def quantized_layers(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED)}


def pack(model: nn.Module):
    """Repack every quantized layer for its device, one at a time (one layer's two forms exist at once)."""
    for m in quantized_layers(model).values():
        m.pack()
    return model


def without_kernel(model: nn.Module) -> list[str]:
    """The quantized layers that found no fused kernel on their device, so dequantize for every product."""
    def fused(m):
        if isinstance(m, Int4Linear):
            return m.layout != "portable"
        return m.weight.device.type != "cpu" or m.scales_bf16 is not None
    return [name for name, m in quantized_layers(model).items() if not fused(m)]


@contextlib.contextmanager
def portable(model: nn.Module):
    """model.state_dict() holds the portable form inside this block (as saved); the device layouts come back
    after it. Layer by layer, in place: saving an int4 model needs no second copy of its weights."""
    layers = [m for m in quantized_layers(model).values() if isinstance(m, Int4Linear)]
    try:
        for m in layers:
            m.unpack()
        yield model
    finally:
        for m in layers:
            m.pack()


def quantized_buffers(model: nn.Module) -> set[str]:
    """Names of the quantized layers' tensors (values, scales, zeros): they keep their own dtypes."""
    return {f"{name}.{k}" for name, m in quantized_layers(model).items() for k, _ in m.named_buffers()}


def weight_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the model's weights, floating point ones (not the quantization scales) counted in `dtype`."""
    quantized = quantized_buffers(model)
    return sum(t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() and name not in quantized
                            else t.element_size()) for name, t in model.state_dict().items())


QUANT_METHOD = "vipllava-weight-only"  # the quantization_config a quantized save_pretrained writes


def quantization_config(weights: str, group_size: int) -> dict:
    """config.json's `quantization_config` for a model quantized here (see saved_quantization)."""
    return {"quant_method": QUANT_METHOD, "weights": weights, "group_size": group_size, "lm_head": "int8",
            "modules": "language_model Linears"}


def saved_quantization(raw: dict, folder, quantize, group_size) -> tuple[str, int] | None:
    """(mode, group size) of a folder save_pretrained wrote from a quantized model; None for a float one."""
    saved = raw.get("quantization_config")
    if not saved:
        return None
    if saved.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{folder} is quantized with {saved.get('quant_method')!r}, which this loader does not read: "
                         f"use the float checkpoint, with quantize='int8' or 'int4' to quantize it here")
    mode, group = saved["weights"], saved.get("group_size", 128)
    asked = group_size if quantize == "int4" and group_size is not None else group  # None: as saved
    if quantize is not None and (quantize, asked) != (mode, group):
        kind = mode + (f" (group size {group})" if mode == "int4" else "")
        raise ValueError(f"{folder} holds a model already quantized to {kind}, but quantize={quantize!r}"
                         f"{f', group_size={group_size}' if quantize == 'int4' else ''} was asked for: load it with "
                         f"quantize=None, or quantize the float checkpoint instead")
    return mode, group
