"""quantize.py: the int8 / int4 formulas against torchao (an independent implementation of the same formulas,
compared exactly), the CPU int4 layout against torch's own packing op, every forward path against
dequantize + F.linear in float64, the error messages, and quantize_language_model on a small Llama.

Tolerances of the forward paths are relative to the output's natural scale, elementwise
|x| @ |W|^T + |b| (what a rounding error in any term of the sum is proportional to):
- FP32_TOL: a path computing in float32 (accumulation error ~ K * 2^-24, far below 1e-5 at these widths);
- BF16_TOL = 2^-6: a path with bf16 in it (activations rounded to bf16, bf16 scales in the int8 kernel, the
  weight in bf16, the output rounded to bf16, the bias added in bf16): each rounding is at most bf16's unit
  roundoff 2^-8 relative (8 significant bits), at most three of them stack up on one output, so 4 * 2^-8
  leaves one rounding of margin.
"""
import logging
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llama
import quantize as Q

FP32_TOL = 1e-5
BF16_U = 2.0**-8  # bf16's unit roundoff: a rounding to bf16 errs by at most 2^-8 relative
BF16_TOL = 4 * BF16_U


@pytest.fixture(scope="module")
def tao():
    """torchao.quantization.utils, imported quietly: it logs "Failed to load ..._C_*.so" (CUDA extensions
    built for another Python) and a pytree deprecation warning, harmless for the pure-PyTorch formulas used."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization.utils as utils
    finally:
        logging.disable(logging.NOTSET)
    return utils


def weights(n, k, dtype=torch.float32, seed=0):
    """Random weights with the awkward rows: all zeros, one huge outlier, all equal (max == min per group)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[0] = 0
    w[1, 5] = 40.0
    w[2] = 0.5
    return w.to(dtype)


def reference(x, w, bias=None):  # dequantize + F.linear, in float64
    y = F.linear(x.double(), w.double())
    return y if bias is None else y + bias.double()


def relative_error(y, x, w, bias=None):
    """max |y - reference| / (|x| @ |W|^T + |b|), elementwise."""
    scale = F.linear(x.double().abs(), w.double().abs())
    if bias is not None:
        scale = scale + bias.double().abs()
    return ((y.double() - reference(x, w, bias)).abs() / scale).max().item()


def int8_layer(n, k, bias=False, dtype=torch.float32, device="cpu", seed=0):
    m = Q.Int8Linear(k, n, bias=bias)
    state = m.from_float(weights(n, k, seed=seed))
    if bias:
        state["bias"] = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        m.bias = nn.Parameter(state["bias"])  # in the activations' dtype, as model.to(dtype) leaves it
    m.load_state_dict(state)
    return m.to(device)


def int4_layer(n, k, group_size=64, bias=False, dtype=torch.float32, device="cpu", seed=0):
    m = Q.Int4Linear(k, n, group_size, bias=bias)
    state = m.from_float(weights(n, k, seed=seed))
    if bias:
        state["bias"] = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        m.bias = nn.Parameter(state["bias"])
    m.load_state_dict(state)
    return m.to(device)


@pytest.fixture
def paths(monkeypatch):
    """Counts which path a forward takes: the aten kernels, in_pieces, or dequantizing the whole weight."""
    taken = {"int8_kernel": 0, "int4_kernel": 0, "in_pieces": 0, "whole": 0}

    def spy(key, fn):
        def wrapper(*args, **kwargs):
            taken[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", spy("int8_kernel", torch.ops.aten._weight_int8pack_mm))
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu",
                        spy("int4_kernel", torch.ops.aten._weight_int4pack_mm_for_cpu))
    monkeypatch.setattr(Q, "in_pieces", spy("in_pieces", Q.in_pieces))
    for cls in (Q.Int8Linear, Q.Int4Linear):
        monkeypatch.setattr(cls, "dequantize", counting_whole(cls.dequantize, taken))
    return taken


def counting_whole(dequantize, taken):
    def wrapper(self, rows=slice(None)):
        taken["whole"] += rows == slice(None)  # the whole weight at once (in_pieces asks for row slices)
        return dequantize(self, rows)
    return wrapper


def only(taken, key):
    """The forward took `key`'s path and no other (in_pieces calls dequantize on slices, not the whole)."""
    return taken[key] > 0 and all(v == 0 for k, v in taken.items() if k != key)


# ---------------------------------------------------------------------------- the formulas, against torchao
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256), (96, 80), (4100, 1024)])  # the last: rows_in_chunks makes 2 chunks
def test_int8_equals_torchao_exactly(tao, dtype, shape):
    w = weights(*shape, dtype)
    q, scales = Q.quantize_int8(w)
    ref_q, ref_scales, zero_points = tao.dynamically_quantize_per_channel(w.float(), -128, 127, torch.int8)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32
    assert torch.equal(q, ref_q) and torch.equal(scales, ref_scales) and not zero_points.any()
    # by hand: a zero row quantizes to zeros (scale clamped to the smallest normal); the outlier is the row's
    # max, 40 / (40 / 127.5) = 127.5, rounds to 128 and clamps to 127
    assert not q[0].any() and q[1, 5] == 127


@pytest.mark.parametrize("group_size", Q.GROUP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_equals_torchao_exactly(tao, group_size, dtype):
    w = weights(160, 512, dtype, seed=group_size)
    packed, scales, zeros = Q.quantize_int4(w, group_size)
    values, scales_and_zeros = tao.groupwise_affine_quantize_tensor(w.float(), n_bit=4, groupsize=group_size,
                                                                    dtype=torch.bfloat16)
    assert packed.dtype == torch.uint8 and packed.shape == (160, 256)
    assert torch.equal(Q.unpack_nibbles(packed).to(torch.int32), values)
    assert torch.equal(scales, scales_and_zeros[..., 0].t()) and torch.equal(zeros, scales_and_zeros[..., 1].t())


def test_int4_equals_torchao_across_chunks(tao):
    w = weights(4160, 1024)  # more than 4M weights: rows_in_chunks quantizes it in 2 chunks
    packed, scales, zeros = Q.quantize_int4(w, 128)
    values, scales_and_zeros = tao.groupwise_affine_quantize_tensor(w, n_bit=4, groupsize=128, dtype=torch.bfloat16)
    assert torch.equal(Q.unpack_nibbles(packed).to(torch.int32), values)
    assert torch.equal(torch.stack([scales, zeros], -1).transpose(0, 1), scales_and_zeros)


@pytest.mark.parametrize("group_size", Q.GROUP_SIZES)
def test_int4_dequantize_equals_torchao_within_bf16_rounding(tao, group_size):
    # torchao dequantizes in bf16 ((q - 8) -> bf16, * s rounded, + z rounded); ours in float32 from the same
    # q, s, z. So |ours - theirs| <= u |(q - 8) s| + u |theirs|, u = 2^-8 (one rounding each).
    w = weights(96, 512, seed=group_size)
    m = Q.Int4Linear(512, 96, group_size)
    m.load_state_dict(m.from_float(w))
    ours = m.dequantize()
    values, scales_and_zeros = tao.groupwise_affine_quantize_tensor(w, n_bit=4, groupsize=group_size,
                                                                    dtype=torch.bfloat16)
    theirs = tao.groupwise_affine_dequantize_tensor(values, scales_and_zeros, 4, group_size).float()
    qs = ((values.view(96, -1, group_size) - 8) * m.scales.float()[..., None]).view(96, -1)
    bound = BF16_U * (qs.abs() + theirs.abs())
    assert ours.dtype == torch.float32 and ((ours - theirs).abs() <= bound).all()
    assert (ours - theirs).abs().max() > 0, "the bf16 and float32 dequantizations should differ somewhere"
    # and it is the original weight's quantization: within half a step s of it, plus the roundings to bf16 of
    # z - 8 s (the grid's origin) and of s (times at most 8 steps out from the zero), u |z| + 16 u s in all
    s, z = (t.float().repeat_interleave(group_size, dim=1) for t in (m.scales, m.zeros))
    assert ((ours - w).abs() <= s * (0.5 + 16 * BF16_U) + BF16_U * z.abs()).all()


# ---------------------------------------------------------------------------- the CPU int4 layout
def test_cpu_int4_block_matches_the_instruction_set():
    capability = torch.backends.cpu.get_cpu_capability()
    expected = {"AVX2": 32, "AVX512": 64}
    if capability in expected:
        assert Q.cpu_int4_block() == expected[capability]
    else:
        assert Q.cpu_int4_block() in (None, 32, 64)


def block_or_skip() -> int:
    block = Q.cpu_int4_block()
    if block is None:  # only allowed off AVX2 / AVX-512 (test_cpu_int4_block_matches_the_instruction_set)
        pytest.skip(f"torch's int4 CPU layout on {torch.backends.cpu.get_cpu_capability()} is not one we know")
    return block


# the real 7B's widths (whole blocks on both kinds) and three of this CPU's blocks
@pytest.mark.parametrize("shape", [(4096, 256), (11008, 128), (64, 4096), ("3 blocks", 64)])
def test_pack_for_cpu_equals_torchs_packing(shape):
    block = block_or_skip()
    shape = (3 * block if shape[0] == "3 blocks" else shape[0], shape[1])
    q = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    packed = Q.pack_for_cpu(q.to(torch.uint8), block)
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
    assert torch.equal(Q.unpack_for_cpu(packed, block), q.to(torch.uint8))


@pytest.mark.parametrize("block", [32, 64])  # both kinds' layouts, on any CPU
def test_pack_for_cpu_follows_the_documented_layout_for_both_blocks(block):
    # the layout written out element by element (quantize.py's comment): for column k of a block of B rows,
    # byte i holds row i in its low nibble and row B/2 + i in its high one
    N, K = 2 * block, 6
    q = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(block), dtype=torch.uint8)
    expected = torch.empty(N // block, K, block // 2, dtype=torch.uint8)  # the bytes in memory order
    for n0 in range(0, N, block):
        for k in range(K):
            for i in range(block // 2):
                expected[n0 // block, k, i] = q[n0 + block // 2 + i, k] << 4 | q[n0 + i, k]
    packed = Q.pack_for_cpu(q, block)
    assert torch.equal(packed.flatten(), expected.flatten())
    assert torch.equal(Q.unpack_for_cpu(packed, block), q)


# ---------------------------------------------------------------------------- forward paths, CPU
DTYPES = [torch.float32, torch.bfloat16]


def check_forward(m, x, tol, taken=None):
    """m(x) against dequantize + F.linear in float64; `taken` (the paths fixture) counts only m(x)'s calls."""
    w = m.dequantize()
    if taken is not None:
        taken.update(dict.fromkeys(taken, 0))
    y = m(x)
    assert y.shape == (*x.shape[:-1], m.out_features) and y.dtype == x.dtype
    err = relative_error(y, x, w, m.bias)
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"
    return err


def activations(rows, k, dtype, seed=2):  # (B, T, K), B * T = rows
    b = 2 if rows % 2 == 0 else 1
    return torch.randn(b, rows // b, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_int8_cpu_kernel(paths, dtype, rows):
    m = int8_layer(96, 256, bias=True, dtype=dtype)
    m.pack()
    assert m.scales_bf16 is not None
    with torch.inference_mode():
        check_forward(m, activations(rows, 256, dtype), BF16_TOL, paths)
    assert only(paths, "int8_kernel")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n, k", [(17, 96, 256), (100, 96, 256), (17, 1100, 4096)])  # 1100: pieces of 1024 + 76
def test_int8_cpu_in_pieces(paths, dtype, rows, n, k):
    m = int8_layer(n, k, bias=True, dtype=dtype)
    m.pack()
    with torch.inference_mode():
        # float32 activations: computed in float32; bf16 ones: in float32 (or bf16 with fast kernels), rounded
        check_forward(m, activations(rows, k, dtype), FP32_TOL if dtype == torch.float32 else BF16_TOL, paths)
    assert only(paths, "in_pieces")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 40])
def test_int8_fallback_when_the_kernel_would_be_wrong(paths, dtype, rows):
    # 100 inputs, not a multiple of 16: there aten._weight_int8pack_mm (torch 2.13, AVX2) gives wrong numbers or
    # segfaults for more than one row, so pack() must leave scales_bf16 None (checked before any forward)
    m = int8_layer(64, 100, bias=True, dtype=dtype)
    m.pack()
    assert m.scales_bf16 is None
    with torch.inference_mode():
        check_forward(m, activations(rows, 100, dtype), FP32_TOL if dtype == torch.float32 else BF16_TOL, paths)
    assert only(paths, "whole")


# widths in this CPU's blocks: whole (3 blocks), and not (2 blocks + 16 rows; half a block): packed with padding
WIDTHS = {"whole blocks": lambda block: 3 * block, "padded": lambda block: 2 * block + 16,
          "half a block": lambda block: block // 2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("width", WIDTHS)
def test_int4_cpu_kernel(paths, dtype, rows, group_size, width):
    block = block_or_skip()
    n = WIDTHS[width](block)
    m = int4_layer(n, 256, group_size, bias=True, dtype=dtype)
    m.pack()
    assert m.layout == "cpu" and m.scales is None
    assert m.scales_and_zeros.shape == (256 // group_size, -(-n // block) * block, 2)
    assert m.weight.shape == (-(-n // block) * block, 128)
    with torch.inference_mode():
        check_forward(m, activations(rows, 256, dtype), BF16_TOL, paths)
    assert only(paths, "int4_kernel")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n, k", [(17, 96, 256), (100, 80, 256), (17, 1056, 4096), (17, 1040, 4096)])
def test_int4_cpu_in_pieces(paths, dtype, rows, n, k):
    # 96 and 1056 (1024 + 32) are whole blocks on AVX2 and padded on AVX-512; 80 and 1040 (1024 + 16) are padded on
    # both; 1056 and 1040 make pieces of 1024 and the rest, the last piece reading a padded block
    block_or_skip()
    m = int4_layer(n, k, 128, bias=True, dtype=dtype)
    m.pack()
    assert m.layout == "cpu"
    with torch.inference_mode():
        check_forward(m, activations(rows, k, dtype), FP32_TOL if dtype == torch.float32 else BF16_TOL, paths)
    assert only(paths, "in_pieces")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 40])
def test_int4_portable_fallback(paths, dtype, rows, monkeypatch):
    # a CPU whose int4 layout we do not know (no AVX2 / AVX-512): pack() leaves the weight portable
    monkeypatch.setattr(Q, "cpu_int4_block", lambda: None)
    m = int4_layer(48, 128, 32, bias=True, dtype=dtype)
    m.pack()
    assert m.layout == "portable" and m.scales_and_zeros is None
    with torch.inference_mode():
        check_forward(m, activations(rows, 128, dtype), FP32_TOL if dtype == torch.float32 else BF16_TOL, paths)
    assert only(paths, "whole")


# ---------------------------------------------------------------------------- gradients through a frozen base (QLoRA)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 40])  # the kernel's path and in_pieces' in forward
@pytest.mark.parametrize("make", [lambda dtype: int8_layer(1100, 256, bias=True, dtype=dtype),
                                  lambda dtype: int4_layer(1100, 256, 64, bias=True, dtype=dtype)], ids=["int8", "int4"])
def test_the_input_gradient_goes_through_the_dequantized_weight(make, dtype, rows):
    # 1100 outputs: the backward's pieces of rows (4M weights / 256 = 16384 per piece here, so one) and the int4
    # layout's padding; the layer's forward is unchanged and the weight gets no gradient
    m = make(dtype)
    m.pack()
    m.bias.requires_grad_(False)
    x = activations(rows, 256, dtype).requires_grad_()
    dy = torch.randn(*x.shape[:-1], 1100, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = m(x)
    with torch.no_grad():
        assert torch.equal(y, m(x))  # the inference path's numbers
    y.backward(dy)
    expected = dy.double() @ m.dequantize().double()  # (..., K)
    err = ((x.grad.double() - expected).norm() / expected.norm()).item()
    assert err <= (FP32_TOL if dtype == torch.float32 else BF16_TOL), err
    assert all(b.grad is None for b in m.buffers()) and m.bias.grad is None


def test_backward_dequantizes_in_pieces_never_the_whole_weight(monkeypatch):
    m = int4_layer(1100, 8192, 128)  # 4M weights / 8192 = 512 rows per piece: 3 pieces
    m.pack()
    seen = []
    dequantize = m.dequantize
    monkeypatch.setattr(m, "dequantize", lambda rows=slice(None): seen.append(rows) or dequantize(rows))
    x = activations(3, 8192, torch.float32).requires_grad_()
    m(x).sum().backward()
    assert seen == [slice(0, 512), slice(512, 1024), slice(1024, 1536)]
    assert torch.allclose(x.grad, torch.ones(1, 3, 1100) @ dequantize(), rtol=1e-5, atol=1e-5)


def test_a_trainable_bias_on_a_quantized_layer_is_refused():
    m = int8_layer(64, 256, bias=True)
    with pytest.raises(ValueError, match="bias cannot be trained"):
        m(torch.randn(2, 256, requires_grad=True))


def test_portable_after_pack_gives_back_the_quantized_tensors():
    w = weights(96, 256)
    # 48 rows: padded to the CPU block when packed, cut off again
    for m in (Q.Int8Linear(256, 96), Q.Int4Linear(256, 96, 64), Q.Int4Linear(256, 48, 64)):
        state = m.from_float(w[:m.out_features])
        m.load_state_dict(state)
        m.pack()
        back = m.portable()
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items()), type(m)


def test_float_in_pieces_with_bf16_weights_equals_float32_linear():
    # Linear's many-rows path for bf16 on a CPU without fast bf16 kernels: float32 products of the bf16 weights
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1100, 4096, generator=g).to(torch.bfloat16)  # 1100 rows: pieces of 1024 and 76
    b = torch.randn(1100, generator=g).to(torch.bfloat16)
    x = torch.randn(2, 20, 4096, generator=g).to(torch.bfloat16)
    y = Q.in_pieces(x, 1100, lambda rows: w[rows], b)
    expected = F.linear(x.float(), w.float(), b.float())
    if Q.cpu_computes(torch.bfloat16):  # computed in bf16 there: within bf16 rounding of the output scale
        assert relative_error(y, x, w, b) <= BF16_TOL
    else:
        assert y.dtype == torch.bfloat16 and torch.equal(y, expected.to(torch.bfloat16))


# ---------------------------------------------------------------------------- float Linear: one bf16 row
@pytest.fixture
def mv_calls(monkeypatch):
    """Counts the products that went through torch.mv (Linear's one-row bf16 path)."""
    calls, mv = [], torch.mv
    monkeypatch.setattr(torch, "mv", lambda *args, **kw: calls.append(1) or mv(*args, **kw))
    return calls


def test_bf16_gemv_follows_the_cpu():
    assert Q.bf16_gemv() == torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@pytest.mark.parametrize("kind", ["avx512", "avx2"])  # both CPU kinds' decisions, on whatever CPU runs this
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 256), (256,), (2, 1, 256), (1, 3, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_float_linear_one_bf16_row(monkeypatch, mv_calls, kind, dtype, shape, bias):
    monkeypatch.setattr(Q, "bf16_gemv", lambda: kind == "avx512")
    torch.manual_seed(0)
    lin = Q.Linear(256, 96, bias=bias).to(dtype)
    x = torch.randn(shape).to(dtype)
    with torch.inference_mode():
        y = lin(x)
    assert y.shape == (*shape[:-1], 96) and y.dtype == dtype
    assert relative_error(y, x, lin.weight, lin.bias) <= (FP32_TOL if dtype == torch.float32 else BF16_TOL)
    one_row = x.numel() == 256
    assert len(mv_calls) == (kind == "avx512" and dtype == torch.bfloat16 and one_row)
    if mv_calls:  # and with autograd on: gradients flow through torch.mv too
        lin(x).sum().backward()
        assert lin.weight.grad is not None and len(mv_calls) == 2


@pytest.mark.parametrize("quantized", [None, "int8", "int4"])
def test_greedy_generation_with_and_without_the_bf16_row_path(monkeypatch, mv_calls, tmp_path, quantized):
    # Token for token the same on a tiny checkpoint in bfloat16, with torch.mv and with F.linear for one row
    # (quantized: the Linears left in bf16 are the vision tower's and the projector's, never one row).
    import tiny_checkpoint
    from vipllava import VipLlava

    text = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                initializer_range=0.2)
    folder = tiny_checkpoint.write_checkpoint(tmp_path, text=text, dtype="bfloat16")
    model = VipLlava.from_pretrained(folder, dtype="bfloat16", quantize=quantized, verbose=False)
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    tokens = {}
    for gemv in (True, False):
        monkeypatch.setattr(Q, "bf16_gemv", lambda: gemv)
        mv_calls.clear()
        tokens[gemv] = model.generate(ids, max_new_tokens=24, eos_token_id=[])
        assert bool(mv_calls) == (gemv and quantized is None)
    assert torch.equal(tokens[True], tokens[False]) and len(set(tokens[True][0].tolist())) > 1


# ---------------------------------------------------------------------------- CUDA
# Not measured (no GPU where this was written): twice the CPU bound, as the GPU's int8 path rounds up to four
# times in bf16 (the product, the scale, the multiplication by it, the bias).
CUDA_BF16_TOL = 2 * BF16_TOL
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
cuda_int4 = pytest.mark.skipif(not (torch.cuda.is_available() and Q.cuda_int4(torch.device("cuda"))),
                               reason="needs CUDA with compute capability 8.0+ (tinygemm)")


@cuda_int4
@pytest.mark.parametrize("rows", [1, 40])
def test_int4_on_cuda(rows):
    cpu = int4_layer(96, 256, 128, bias=True, dtype=torch.bfloat16)
    m = int4_layer(96, 256, 128, bias=True, dtype=torch.bfloat16, device="cuda")
    m.pack()
    assert m.layout == "cuda"
    x = activations(rows, 256, torch.bfloat16).cuda()
    with torch.inference_mode():
        check_forward(m, x, CUDA_BF16_TOL)
    assert torch.equal(m.dequantize().cpu(), cpu.dequantize())
    back, expected = m.portable(), cpu.portable()  # tinygemm's tiles read back exactly
    assert back.keys() == expected.keys() and all(torch.equal(back[k].cpu(), v) for k, v in expected.items())


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 40])
def test_int8_on_cuda(dtype, rows):
    m = int8_layer(96, 256, bias=True, dtype=dtype, device="cuda")
    m.pack()
    assert m.scales_bf16 is None  # the CPU kernel's scales are not made on the GPU
    with torch.inference_mode():
        tol = 1e-3 if dtype == torch.float32 else CUDA_BF16_TOL  # float32: 1e-3 in case TF32 (10 bits) is on
        check_forward(m, activations(rows, 256, dtype).cuda(), tol)


@cuda
@pytest.mark.parametrize("layer", ["int8", "int4"])
def test_quantized_layers_under_torch_compile_on_cuda(layer):
    if layer == "int4" and not Q.cuda_int4(torch.device("cuda")):
        pytest.skip("tinygemm needs compute capability 8.0+")
    make = int8_layer if layer == "int8" else int4_layer
    m = make(96, 256, bias=True, dtype=torch.bfloat16, device="cuda")
    m.pack()
    compiled = torch.compile(m, fullgraph=True)
    with torch.inference_mode():
        for rows in (1, 40):
            x = activations(rows, 256, torch.bfloat16).cuda()
            check_forward(compiled, x, CUDA_BF16_TOL)


# ---------------------------------------------------------------------------- errors
def test_errors():
    with pytest.raises(ValueError,
                       match=r"unknown quantize value 'int3': use None \(no quantization\), 'int8' or 'int4'"):
        Q.check_mode("int3")
    with pytest.raises(ValueError, match="int4 group size 64 does not divide a layer width of 96: use group size 32"):
        Q.Int4Linear(96, 64, group_size=64)
    with pytest.raises(ValueError, match=r"int4 group size 48 is not supported: use one of \(32, 64, 128, 256\)"):
        Q.Int4Linear(96, 64, group_size=48)
    with pytest.raises(ValueError, match="does not divide a layer width of 100: quantize this model to int8"):
        Q.quantize_int4(torch.randn(8, 100), 32)
    with pytest.raises(ValueError, match="int4 group size 16 is not supported"):
        Q.quantize_int4(torch.randn(8, 128), 16)
    with pytest.raises(ValueError, match="unknown quantize value"):
        Q.quantize_language_model(nn.Module(), "fp8")


# ---------------------------------------------------------------------------- the model
def small_llama():
    c = llama.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return llama.Llama(c), c


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_language_model(mode):
    float_model, c = small_llama()
    linears = {name: (m.out_features, m.in_features) for name, m in float_model.named_modules()
               if isinstance(m, nn.Linear)}
    assert len(linears) == 7 * c.num_hidden_layers + 1
    model = Q.quantize_language_model(small_llama()[0], mode, group_size=64)

    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # quantize.Linear is an nn.Linear too
    for name, shape in linears.items():
        m = model.get_submodule(name)
        expected = Q.Int8Linear if mode == "int8" or name == "lm_head" else Q.Int4Linear
        assert type(m) is expected and (m.out_features, m.in_features) == shape, name
    assert type(model.lm_head) is Q.Int8Linear

    extra = ("scales",) if mode == "int8" else ("scales", "zeros")
    expected_keys = set(float_model.state_dict()) | {
        f"{name}.{k}" for name in linears for k in (("scales",) if name == "lm_head" else extra)}
    assert set(model.state_dict()) == expected_keys

    # bytes, from the shapes alone: int8 N K + 4 N (float32 scales); int4 N K / 2 + 2 * 2 N K / g (bf16 s, z)
    def layer_bytes(name, n, k):
        return n * k + 4 * n if mode == "int8" or name == "lm_head" else n * k // 2 + 4 * n * (k // 64)
    quantized = sum(layer_bytes(name, n, k) for name, (n, k) in linears.items())
    floats = c.vocab_size * c.hidden_size + c.hidden_size * (2 * c.num_hidden_layers + 1)  # embeddings, norms
    assert Q.weight_bytes(model) == quantized + 4 * floats
    assert Q.weight_bytes(model, torch.bfloat16) == quantized + 2 * floats
    assert Q.weight_bytes(float_model) == 4 * (floats + sum(n * k for n, k in linears.values()))
