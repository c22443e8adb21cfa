"""Tests of kdq_bench.export: bit packing, packed formats, PackedLinear (kernels and dequant path), save/load."""
import copy, json, math, pickle, struct
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from kdq_bench.quantizers import (ALL_WEIGHT_FORMATS, FP4_E2M1_CODEBOOK, NF4_CODEBOOK, FakeQuantLinear, QTensor,
                                  QuantSpec, dequantize, fake_quant, quantize, quantize_model, set_quant_enabled)
from kdq_bench.export import (CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, HF_CONFIG_NAME, WEIGHTS_NAME, PackedLinear,
                              e8m0_decode, e8m0_encode, export_linear, int4pack_group, load_quantized, pack_bits,
                              pack_qtensor, packed_nbytes, read_quant_config, round_dense, save_quantized, scale_shape,
                              tensors_nbytes, to_int4pack, unpack_bits, unpack_qtensor)

EXTRA_FORMATS = ['int8-asym', 'int2', 'int3', 'int5-g32', 'int6-tensor', 'int7-g64-asym', 'int3-g96', 'int4-tensor-asym',
                 'nf4-g32', 'fp8-e4m3-ch', 'fp8-e5m2-ch']
FORMATS = ALL_WEIGHT_FORMATS + EXTRA_FORMATS
U32 = 2.0 ** -24   # unit roundoff of float32


def ref_pack(values, bits):
    "Independent bit-by-bit reference of the LSB-first bitstream."
    stream = [(v >> i) & 1 for v in values for i in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return [sum(stream[8 * j + i] << i for i in range(8)) for j in range(len(stream) // 8)]


def ref_unpack(byts, bits, n):
    stream = [(b >> i) & 1 for b in byts for i in range(8)]
    return [sum(stream[bits * k + i] << i for i in range(bits)) for k in range(n)]


# ---------------------------------------------------------------- bit packing

@pytest.mark.parametrize('bits', range(1, 9))
@pytest.mark.parametrize('n', [0, 1, 3, 7, 8, 9, 17, 64, 333])
def test_pack_bits_matches_reference_and_roundtrips(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    c = torch.randint(0, 2 ** bits, (n,), generator=g)
    p = pack_bits(c, bits)
    assert p.dtype == torch.uint8 and p.dim() == 1
    assert p.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    assert p.tolist() == ref_pack(c.tolist(), bits)
    assert unpack_bits(p, bits, n).tolist() == c.tolist() == ref_unpack(p.tolist(), bits, n)


def test_pack_bits_layouts():
    assert pack_bits(torch.tensor([0x3, 0xA]), 4).tolist() == [0xA3]            # even index in the low nibble
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    v = [7, 6, 5, 4, 3, 2, 1, 0]                                                    # 8 codes in 3 bytes
    assert pack_bits(torch.tensor(v), 3).tolist() == list(sum(x << 3 * i for i, x in enumerate(v)).to_bytes(3, 'little'))
    c = torch.randint(0, 16, (5, 6), dtype=torch.int32)                             # any shape: flattened row-major
    assert torch.equal(pack_bits(c, 4), pack_bits(c.flatten(), 4))


def test_pack_bits_errors():
    with pytest.raises(ValueError, match=r'\[0, 3\]'): pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match=r'\[0, 255\]'): pack_bits(torch.tensor([-1]), 8)
    with pytest.raises(ValueError, match='integer'): pack_bits(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match='integer'): pack_bits(torch.tensor([True]), 1)
    for bad in (0, 9, 4.0, True):
        with pytest.raises(ValueError, match='1..8'): pack_bits(torch.tensor([0]), bad)
    with pytest.raises(ValueError, match='take 2 bytes'): unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 4)
    with pytest.raises(ValueError, match='1-d uint8'): unpack_bits(torch.zeros(2, dtype=torch.int8), 4, 4)
    with pytest.raises(ValueError, match='1-d uint8'): unpack_bits(torch.zeros(1, 2, dtype=torch.uint8), 4, 4)


def test_e8m0():
    e = torch.arange(255, dtype=torch.uint8)
    s = e8m0_decode(e)
    assert s.tolist() == [2.0 ** (k - 127) for k in range(255)]
    assert torch.equal(e8m0_encode(s), e)
    for bad in (0.0, -1.0, 3.0, float('nan'), float('inf'), 2.0 ** -128, 2.0 ** 128):
        with pytest.raises(ValueError, match='powers of two'): e8m0_encode(torch.tensor([bad], dtype=torch.float64).float())
    with pytest.raises(ValueError, match='NaN'): e8m0_decode(torch.tensor([255], dtype=torch.uint8))


# ---------------------------------------------------------------- packed QTensors

def ref_dequant(qt):
    "Independent dequantization from the QTensor fields, per element."
    spec, (out, n) = qt.spec, qt.shape
    glen = spec.group_size if spec.granularity == 'group' else n
    col_group = torch.arange(n) // glen
    s = qt.scale.float().expand(out, -1)[:, col_group] if spec.granularity != 'tensor' else qt.scale.float().expand(out, n)
    if spec.kind in ('int', 'gguf'):
        z = 0 if qt.zero is None else qt.zero.float().expand(out, -1)[:, col_group] if spec.granularity != 'tensor' else qt.zero.float()
        return (qt.codes.float() - z) * s
    if spec.kind == 'fp8': return qt.codes.float() * s
    if spec.kind == 'nf4': return NF4_CODEBOOK[qt.codes.long()] * s
    return FP4_E2M1_CODEBOOK[qt.codes.long()] * (s * (qt.global_scale if spec.kind == 'nvfp4' else 1.0))


@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('shape', [(48, 256), (7, 50), (16, 96)])
def test_pack_qtensor_roundtrip_exact(fmt, shape):
    torch.manual_seed(0)
    w = torch.randn(*shape) * torch.rand(shape[0], 1) * 3
    qt = quantize(w, fmt)
    packed = pack_qtensor(qt)
    back = unpack_qtensor(packed, fmt, shape)
    assert back.shape == tuple(shape) and back.spec == QuantSpec.parse(fmt)
    fq = fake_quant(w, fmt)
    assert torch.equal(dequantize(back), fq)                       # the packed bytes give the fake-quant weights
    assert torch.equal(ref_dequant(back), fq)                      # ... also by an independent formula
    spec = qt.spec
    if spec.kind in ('int', 'gguf'):
        assert back.codes.dtype == qt.codes.dtype == (torch.int8 if spec.symmetric else torch.uint8)
        assert torch.equal(back.codes, qt.codes)
        assert packed['qweight'].numel() == math.ceil(w.numel() * spec.bits / 8)
        assert (packed['zero'] is not None) if not spec.symmetric else ('zero' not in packed)
    elif spec.kind == 'fp8':
        assert packed['qweight'].dtype == qt.codes.dtype and torch.equal(back.codes.view(torch.uint8), qt.codes.view(torch.uint8))
    else:
        assert torch.equal(back.codes, qt.codes)
        assert packed['qweight'].numel() == math.ceil(w.numel() / 2)
    assert torch.equal(back.scale, qt.scale)
    if spec.kind == 'mxfp4': assert packed['scale'].dtype == torch.uint8
    if spec.kind == 'nvfp4':
        assert packed['scale'].dtype == torch.float8_e4m3fn and packed['global_scale'].dtype == torch.float32
        assert torch.equal(back.global_scale, qt.global_scale.float())
    if spec.kind in ('int', 'nf4'): assert packed['scale'].dtype == torch.float32
    if spec.kind == 'gguf': assert packed['scale'].dtype == torch.float16   # ggml's d, exactly
    assert tuple(packed['scale'].shape) == scale_shape(spec, shape)


def test_int8_codes_full_range():
    "int8 codes span all 256 values: -128..127 symmetric, 0..255 asymmetric; packing keeps every byte."
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for fmt, lo, hi in (('int8', -127, 127), ('int8-asym', 0, 255)):
        qt = quantize(w, fmt)
        assert int(qt.codes.min()) == lo and int(qt.codes.max()) == hi
        back = unpack_qtensor(pack_qtensor(qt), fmt, w.shape)
        assert torch.equal(back.codes, qt.codes) and torch.equal(dequantize(back), fake_quant(w, fmt))
    qt = hand_qtensor('int8', 16, 64)            # -128 too
    assert int(qt.codes.min()) == -128
    assert torch.equal(unpack_qtensor(pack_qtensor(qt), 'int8', (16, 64)).codes, qt.codes)


def test_zero_points_outside_code_range():
    w = torch.rand(4, 64) + 3.0                      # all positive: zero point = round(-min/scale) < 0
    qt = quantize(w, 'int4-asym')
    assert qt.zero.min() < 0
    packed = pack_qtensor(qt)
    assert packed['zero'].dtype == torch.int8
    assert torch.equal(dequantize(unpack_qtensor(packed, 'int4-asym', w.shape)), fake_quant(w, 'int4-asym'))


def test_packed_sizes_bits_per_weight():
    w = torch.randn(128, 512)
    n = w.numel()
    expect = {'int4-g128': n / 2 + 4 * 128 * 4, 'int3-g128': n * 3 / 8 + 4 * 128 * 4, 'int2-g64': n / 4 + 4 * 128 * 8,
              'int8': n + 4 * 128, 'mxfp4': n / 2 + 128 * 16, 'nvfp4': n / 2 + 128 * 32 + 4,
              'nf4-g64': n / 2 + 4 * 128 * 8, 'fp8-e4m3': n + 4, 'int4-g128-asym': n / 2 + 5 * 128 * 4}
    for fmt, nbytes in expect.items():
        assert tensors_nbytes(pack_qtensor(quantize(w, fmt))) == nbytes, fmt


def test_pack_errors():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match='per token'): pack_qtensor(quantize(w, 'int8-token'))
    with pytest.raises(ValueError, match='per token'): pack_qtensor(quantize(w, 'fp8-e4m3-token'))
    qt = quantize(w, 'mxfp4')
    with pytest.raises(ValueError, match='powers of two'): pack_qtensor(QTensor(qt.spec, qt.shape, qt.codes, qt.scale * 1.5))
    qt = quantize(w, 'nvfp4')
    with pytest.raises(ValueError, match='float8_e4m3fn'):
        pack_qtensor(QTensor(qt.spec, qt.shape, qt.codes, qt.scale + 1e-3, None, qt.global_scale))
    with pytest.raises(ValueError, match='global_scale'): pack_qtensor(QTensor(qt.spec, qt.shape, qt.codes, qt.scale))
    qt = quantize(w, 'int4-g32')
    with pytest.raises(ValueError, match=r'scales of shape \(4, 2\)'): pack_qtensor(QTensor(qt.spec, qt.shape, qt.codes, qt.scale.t()))
    with pytest.raises(ValueError, match='codes have shape'): pack_qtensor(QTensor(qt.spec, qt.shape, qt.codes[:, :32], qt.scale))
    bad = qt.codes.clone(); bad[0, 0] = 8   # outside [-8, 7]
    with pytest.raises(ValueError, match=r'\[0, 15\]'): pack_qtensor(QTensor(qt.spec, qt.shape, bad, qt.scale))
    qa = quantize(w, 'int4-g32-asym')
    with pytest.raises(ValueError, match='zero points'): pack_qtensor(QTensor(qa.spec, qa.shape, qa.codes, qa.scale))
    with pytest.raises(ValueError, match='2-d'): pack_qtensor(quantize(torch.randn(2, 3, 8), 'int4'))
    q8 = quantize(w, 'fp8-e4m3')
    with pytest.raises(ValueError, match='float8_e4m3fn'): pack_qtensor(QTensor(QuantSpec.parse('fp8-e5m2'), q8.shape, q8.codes, q8.scale))
    packed = pack_qtensor(qt)
    with pytest.raises(ValueError, match='take'): unpack_qtensor(packed, 'int4-g32', (4, 60))
    with pytest.raises(ValueError, match='missing'): unpack_qtensor({'qweight': packed['qweight']}, 'int4-g32', (4, 64))
    with pytest.raises(ValueError, match='scales of shape'): unpack_qtensor(packed, 'int4-g16', (4, 64))
    with pytest.raises(ValueError, match='stored as torch.float32'):
        unpack_qtensor({**packed, 'scale': packed['scale'].half()}, 'int4-g32', (4, 64))
    with pytest.raises(ValueError, match='unknown quantization format'): unpack_qtensor(packed, 'int9', (4, 64))


# ---------------------------------------------------------------- kernels and PackedLinear

def kernel_bound(x, w_deq, extra=2):
    """Rigorous float32 error bound of a length-K dot product computed in any order (plus `extra` roundings of each
    weight, e.g. the kernel's (u-8)*s + zero): (K + extra) * u * (|x| @ |W|^T) elementwise."""
    k = x.shape[-1]
    return (k + extra) * U32 * (x.double().abs() @ w_deq.double().abs().t()) + 1e-30


def hand_qtensor(spec, out, n, seed=0):
    "A QTensor built by hand (codes and scales drawn directly, not from quantize)."
    spec = QuantSpec.parse(spec)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (out, n), generator=g).to(torch.int8 if spec.qmax <= 127 else torch.int16)
    sshape = scale_shape(spec, (out, n))
    scale = torch.rand(sshape, generator=g) * 0.1 + 0.01
    zero = None if spec.symmetric else torch.randint(spec.qmin, spec.qmax + 1, sshape, generator=g).to(torch.int32)
    return QTensor(spec, (out, n), codes, scale, zero)


@pytest.mark.parametrize('fmt,shape,group', [('int4-g128', (32, 256), 128), ('int4-g64-asym', (48, 192), 64),
                                             ('int4', (16, 576), 64), ('int4-tensor', (16, 96), 32),
                                             ('int4-g192', (32, 576), 64), ('int4-g128', (16, 576), 64),
                                             ('int3-g64-asym', (32, 128), 64), ('int2-g32', (16, 64), 32),
                                             ('int4-g512-asym', (16, 1024), 256)])
def test_int4_kernel_on_hand_built_codes(fmt, shape, group):
    qt = hand_qtensor(fmt, *shape)
    assert int4pack_group(qt.spec, shape) == group
    _, g, sz = to_int4pack(qt)
    assert g == group and sz.shape == (shape[1] // g, shape[0], 2)
    pl = PackedLinear.from_qtensor(qt, backend='int4pack')
    w = ref_dequant(qt)
    x = torch.randn(5, shape[1])
    y = pl(x)
    ref = x.double() @ w.double().t()
    assert ((y.double() - ref).abs() <= kernel_bound(x, w)).all()
    assert (pl.dequantized_weight() - w).abs().max() <= 2 * U32 * w.abs().max()   # the kernel's own dequantization


def test_int8_kernel_on_hand_built_codes():
    for fmt in ('int8', 'int8-tensor', 'int4', 'int3-tensor'):
        qt = hand_qtensor(fmt, 24, 80, seed=1)
        pl = PackedLinear.from_qtensor(qt, backend='int8pack')
        w = ref_dequant(qt)
        x = torch.randn(3, 4, 80)
        y = pl(x)
        assert y.shape == (3, 4, 24)
        ref = x.double() @ w.double().t()
        assert ((y.double() - ref).abs() <= kernel_bound(x, w)).all()
        assert torch.equal(pl.dequantized_weight(), w)


@pytest.mark.parametrize('fmt', FORMATS + ['int8-token'])
def test_packed_linear_dequant_path_is_bit_exact(fmt):
    torch.manual_seed(1)
    lin = nn.Linear(96, 32)
    a_spec = 'int8-token' if fmt == 'int8-token' else None
    w_fmt = 'int4-g32' if fmt == 'int8-token' else fmt
    fq = FakeQuantLinear.from_linear(lin, w_fmt, a_spec)
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        ref = fq(x)
        assert torch.equal(ref, F.linear(fake_quant(x, a_spec) if a_spec else x, fake_quant(lin.weight, w_fmt), lin.bias))
        pl = PackedLinear.from_fake_quant(fq, backend='dequant')
        assert torch.equal(pl(x), ref)


@pytest.mark.parametrize('fmt', FORMATS)
def test_dequant_path_row_chunks(fmt):
    """Row-chunked dequantize-then-matmul: the same dequantized rows (exact), multiplied in several BLAS calls, so the
    outputs stay within the float32 summation-order bound of the fake-quant layer; rows need not be byte-aligned."""
    torch.manual_seed(5)
    lin = nn.Linear(50, 75)                       # 50 * 3 bits = 150 bits per row: rows not byte-aligned
    fq = FakeQuantLinear.from_linear(lin, fmt)
    x = torch.randn(3, 4, 50)
    with torch.no_grad():
        ref, wq = fq(x), fq.quantized_weight()
        exact = x.double() @ wq.double().t() + lin.bias.double()
        bound = 2 * kernel_bound(x, wq) + 2 * U32 * exact.abs()      # two float32 summations, each within the bound
        for rows in (8, 24, 64):
            pl = PackedLinear.from_fake_quant(fq, backend='dequant', chunk_rows=rows)
            assert ((pl(x).double() - ref.double()).abs() <= bound).all(), rows
        pl = PackedLinear.from_fake_quant(fq, backend='dequant', chunk_rows=8)
        full = pl.qtensor()
        for r0, r1 in ((16, 40), (72, 75), (0, 8)):
            assert torch.equal(dequantize(pl.qtensor(slice(r0, r1))), dequantize(full)[r0:r1])
    with pytest.raises(ValueError, match='multiple of 8'): pl.qtensor(slice(4, 12))
    with pytest.raises(ValueError, match='chunk_rows'): PackedLinear.from_fake_quant(fq, backend='dequant', chunk_rows=12)


@pytest.mark.parametrize('fmt,backend', [('int4-g32', 'int4pack'), ('int4-g32-asym', 'int4pack'), ('int4', 'int4pack'),
                                         ('int3-g32', 'int4pack'), ('int8', 'int8pack'), ('int8-tensor', 'int8pack')])
def test_packed_linear_kernels_within_float32_bound(fmt, backend):
    torch.manual_seed(2)
    lin = nn.Linear(256, 64)
    fq = FakeQuantLinear.from_linear(lin, fmt)
    pl = PackedLinear.from_fake_quant(fq, backend=backend)
    assert pl.backend == backend
    x = torch.randn(7, 256)
    with torch.no_grad():
        wq = fake_quant(lin.weight, fmt)
        exact = x.double() @ wq.double().t() + lin.bias.double()
        bound = kernel_bound(x, wq) + 2 * U32 * exact.abs()     # + the separate bias add
        assert ((pl(x).double() - exact).abs() <= bound).all()
        assert ((fq(x).double() - exact).abs() <= bound).all()


def test_packed_linear_bf16_compute():
    torch.manual_seed(3)
    lin = nn.Linear(256, 64, bias=False)
    fq = FakeQuantLinear.from_linear(lin, 'int4-g64')
    pl = PackedLinear.from_fake_quant(fq, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 256)
    with torch.no_grad(): y, ref = pl(x), fq(x)
    assert y.dtype == torch.float32
    # bf16 input rounding (2^-9 relative per element) plus bf16 output rounding: bounded by 2^-8 of |x| @ |W|^T
    wq = fake_quant(lin.weight, 'int4-g64')
    assert ((y - ref).abs() <= 2.0 ** -7 * (x.abs() @ wq.abs().t())).all()


def test_auto_backend_choice_and_errors():
    assert PackedLinear.from_qtensor(quantize(torch.randn(32, 128), 'int4-g64')).backend == 'int4pack'
    assert PackedLinear.from_qtensor(quantize(torch.randn(32, 128), 'int8')).backend == 'int8pack'
    for fmt in ('int3-g64', 'int2-g64', 'nf4-g64', 'mxfp4', 'nvfp4', 'fp8-e4m3', 'int8-asym', 'int8-g64', 'int4-g16'):
        assert PackedLinear.from_qtensor(quantize(torch.randn(32, 128), fmt)).backend == 'dequant', fmt
    assert PackedLinear.from_qtensor(quantize(torch.randn(20, 128), 'int4-g64')).backend == 'dequant'  # 20 % 16 != 0
    with pytest.raises(ValueError, match='int4 CPU kernel'): PackedLinear.from_qtensor(quantize(torch.randn(32, 128), 'nf4-g64'), backend='int4pack')
    with pytest.raises(ValueError, match='int4 CPU kernel'): PackedLinear.from_qtensor(quantize(torch.randn(32, 128), 'int8'), backend='int4pack')
    with pytest.raises(ValueError, match='symmetric'): PackedLinear.from_qtensor(quantize(torch.randn(32, 128), 'int4-g64'), backend='int8pack')
    with pytest.raises(ValueError, match='backend must be'): PackedLinear.from_qtensor(quantize(torch.randn(32, 128), 'int4'), backend='gpu')
    qt = quantize(torch.randn(32, 128), 'int4-g64')
    with pytest.raises(ValueError, match='bias must have shape'): PackedLinear.from_qtensor(qt, bias=torch.zeros(31))
    with pytest.raises(ValueError, match='int4pack backend keeps only'): PackedLinear.from_qtensor(qt).qtensor()


def test_export_linear_every_quantizer_mode_exact():
    torch.manual_seed(4)
    lin = nn.Linear(128, 48)
    for fmt, mode in [('int4-g32', 'learned'), ('int3-g64-asym', 'learned'), ('int8-asym', 'learned'), ('gguf-q4_0', 'learned'),
                      ('int4-g32-asym', 'clip'), ('int2', 'clip'), ('int4-g32', 'frozen'), ('nvfp4', 'frozen')]:
        fq = FakeQuantLinear.from_linear(lin, fmt, mode=mode)
        with torch.no_grad():       # as if trained: move the learnable quantizer parameters
            for p in fq.weight_quantizer.parameters(): p.add_(0.3 * torch.rand_like(p) * p.abs().mean())
            packed = export_linear(fq)
            ref = fq.quantized_weight()
        assert torch.equal(dequantize(unpack_qtensor(packed, fmt, (48, 128))), ref), (fmt, mode)
        x = torch.randn(3, 128)
        with torch.no_grad(): assert torch.equal(PackedLinear.from_fake_quant(fq, backend='dequant')(x), fq(x))


def test_export_refuses_disabled_quantizer():
    model = quantize_model(nn.Sequential(nn.Linear(16, 16)), 'int4-g16')
    set_quant_enabled(model, False)
    with pytest.raises(ValueError, match='disabled'): export_linear(model[0])


# ---------------------------------------------------------------- save / load

def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 96, bias=False), nn.GELU(),
                         nn.Linear(96, 48), nn.LayerNorm(48), nn.Linear(48, 10))


def bf16_dense(model):
    """Independent reference of the default artifact (not `round_dense`): in place, every parameter outside the quantized
    layers, and the quantized layers' biases, rounded to bf16 and back; their master weights and quantizer state untouched.
    (The models here hold no persistent floating buffers outside the quantized layers.)"""
    inside = {id(s) for f in model.modules() if isinstance(f, FakeQuantLinear) for s in f.modules()}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FakeQuantLinear):
                if m.bias is not None: m.bias.copy_(m.bias.bfloat16().float())
            elif id(m) not in inside:
                for p in m.parameters(recurse=False): p.copy_(p.bfloat16().float())
    return model


def mixed_fake_quant_mlp():
    m = mlp(0)
    m[0] = FakeQuantLinear.from_linear(m[0], 'int4-g32')
    m[2] = FakeQuantLinear.from_linear(m[2], 'nvfp4', a_spec='int8-token')
    m[4] = FakeQuantLinear.from_linear(m[4], 'int3-g32-asym', mode='learned')
    with torch.no_grad(): m[4].weight_quantizer.scale.mul_(1.1)
    return m   # m[6] stays nn.Linear (FP32), m[5] LayerNorm


def test_save_load_sequential(tmp_path):
    fq = mixed_fake_quant_mlp()
    x = torch.randn(6, 64)
    with torch.no_grad(): ref = bf16_dense(fq)(x)     # the default artifact stores the dense tensors in bf16
    save_quantized(fq, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])   # no config.json: not transformers
    # JSON contents
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg['format'] == FORMAT_NAME and cfg['version'] == FORMAT_VERSION
    assert cfg['model'] == {'class': 'torch.nn.modules.container.Sequential', 'transformers': False}
    assert cfg['layers'] == {
        '0': {'spec': 'int4-g32', 'a_spec': None, 'shape': [96, 64], 'bias': True, 'tensors': ['qweight', 'scale']},
        '2': {'spec': 'nvfp4', 'a_spec': 'int8-token', 'shape': [96, 96], 'bias': False, 'tensors': ['qweight', 'scale', 'global_scale']},
        '4': {'spec': 'int3-g32-asym', 'a_spec': None, 'shape': [48, 96], 'bias': True, 'tensors': ['qweight', 'scale', 'zero']}}
    assert cfg['tied'] == {} and cfg['embedding'] is None
    assert cfg['dense'] == {'dtype': 'bfloat16', 'cast': {k: 'float32' for k in ('0.bias', '4.bias', '5.weight', '5.bias', '6.weight', '6.bias')}}
    assert set(cfg['packing']) >= {'codes', 'int', 'nf4', 'mxfp4', 'nvfp4', 'fp8', 'dense', 'embedding'}
    # safetensors contents: packed layers + every other tensor, nothing else
    with safe_open(str(tmp_path / WEIGHTS_NAME), 'pt') as f:
        keys = set(f.keys())
        assert f.metadata()['kdq_bench'] == FORMAT_NAME
        assert f.get_tensor('0.qweight').dtype == torch.uint8 and f.get_tensor('0.qweight').numel() == 96 * 64 // 2
        assert f.get_tensor('4.qweight').numel() == 48 * 96 * 3 // 8
        assert f.get_tensor('2.scale').dtype == torch.float8_e4m3fn
        for k in ('6.weight', '6.bias', '5.weight', '5.bias', '0.bias', '4.bias'):
            assert f.get_tensor(k).dtype == torch.bfloat16 and torch.equal(f.get_tensor(k).float(), fq.state_dict()[k]), k
    assert keys == {'0.qweight', '0.scale', '0.bias', '2.qweight', '2.scale', '2.global_scale', '4.qweight', '4.scale', '4.zero',
                    '4.bias', '5.weight', '5.bias', '6.weight', '6.bias'}
    # load into a differently initialised skeleton
    for backend in ('dequant', 'auto'):
        m = load_quantized(tmp_path, mlp(seed=123), backend=backend)
        assert [type(l).__name__ for l in m] == ['PackedLinear', 'GELU', 'PackedLinear', 'GELU', 'PackedLinear', 'LayerNorm', 'Linear']
        assert not m.training
        assert all(v.dtype == torch.float32 for k, v in m.state_dict().items() if k.endswith(('bias', '5.weight', '6.weight'))) # cast back
        with torch.no_grad(): out = m(x)
        if backend == 'dequant': assert torch.equal(out, ref)
        else:
            assert m[0].backend == 'int4pack' and m[2].backend == 'dequant'
            # one int4-kernel layer feeding exact layers: float32 reordering errors, amplified at most by the
            # following layers' norms; 1e-4 is ~1000x the float32 unit roundoff on outputs of order 1
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_save_load_a_fake_quant_skeleton(tmp_path):
    "The skeleton may itself be a fake-quantized model (its FakeQuantLinears are replaced)."
    fq = mixed_fake_quant_mlp()
    save_quantized(fq, tmp_path)
    m = load_quantized(tmp_path, mixed_fake_quant_mlp(), backend='dequant')
    x = torch.randn(2, 64)
    with torch.no_grad(): assert torch.equal(m(x), bf16_dense(fq)(x))


def tiny_llama(tie=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize('fmt', ['int4-g32', 'int4-g32-asym', 'int8', 'nf4-g32', 'mxfp4', 'int3-g32', 'fp8-e4m3'])
def test_save_load_tiny_llama(tmp_path, fmt):
    model = quantize_model(tiny_llama(), fmt)
    ids = torch.randint(0, 128, (2, 10))
    save_quantized(model, tmp_path)
    bf16_dense(model)            # the reference: the fake-quantized model with its dense tensors rounded as stored
    with torch.no_grad(): ref = model(ids).logits
    assert (tmp_path / HF_CONFIG_NAME).exists()
    cfg = read_quant_config(tmp_path)
    assert cfg['model'] == {'class': 'transformers.models.llama.modeling_llama.LlamaForCausalLM', 'transformers': True}
    assert cfg['tied'] == {'lm_head.weight': 'model.embed_tokens.weight'}
    assert len(cfg['layers']) == 14 and all(l['spec'] == str(QuantSpec.parse(fmt)) for l in cfg['layers'].values())
    with safe_open(str(tmp_path / WEIGHTS_NAME), 'pt') as f: keys = set(f.keys())
    assert 'model.embed_tokens.weight' in keys and 'lm_head.weight' not in keys and 'model.norm.weight' in keys
    assert 'model.layers.0.input_layernorm.weight' in keys and 'model.layers.1.mlp.down_proj.qweight' in keys
    assert not any(k.endswith('proj.weight') for k in keys)
    m = load_quantized(tmp_path, backend='dequant')                           # rebuilt from config.json
    assert m.lm_head.weight is m.model.embed_tokens.weight
    with torch.no_grad(): out = m(ids).logits
    assert torch.equal(out, ref)
    m2 = load_quantized(tmp_path, tiny_llama(seed=5))                        # skeleton, auto backends
    with torch.no_grad(): out2 = m2(ids).logits
    # kernels (int4/int8 layers) reorder float32 sums; through 2 layers the logits (|logit| < ~1) move by < 1e-4
    torch.testing.assert_close(out2, ref, rtol=0, atol=1e-4)
    with torch.no_grad():
        g_ref = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
        assert torch.equal(m.generate(ids[:1], max_new_tokens=5, do_sample=False), g_ref)


@pytest.mark.parametrize('dense', [None, torch.bfloat16])
def test_untied_lm_head_kept_dense(tmp_path, dense):
    model = quantize_model(tiny_llama(tie=False), 'int4-g32')
    save_quantized(model, tmp_path, dense_dtype=dense)
    cfg = read_quant_config(tmp_path)
    assert cfg['tied'] == {} and 'lm_head' not in cfg['layers']
    with safe_open(str(tmp_path / WEIGHTS_NAME), 'pt') as f:
        assert torch.equal(f.get_tensor('lm_head.weight'), model.lm_head.weight.to(dense or torch.float32))
    m = load_quantized(tmp_path, tiny_llama(tie=False, seed=9), backend='dequant')
    ids = torch.randint(0, 128, (1, 8))
    if dense is not None: bf16_dense(model)
    with torch.no_grad(): assert torch.equal(m(ids).logits, model(ids).logits)


def test_loading_uses_safetensors_only(tmp_path, monkeypatch):
    model = quantize_model(tiny_llama(), 'int4-g32')
    save_quantized(model, tmp_path)
    assert not list(tmp_path.glob('*.bin')) and not list(tmp_path.glob('*.pt')) and not list(tmp_path.glob('*.pkl'))
    def refuse(*a, **k): raise AssertionError('pickle / torch.load used while loading')
    monkeypatch.setattr(torch, 'load', refuse)
    monkeypatch.setattr(pickle, 'load', refuse)
    monkeypatch.setattr(pickle, 'loads', refuse)
    m = load_quantized(tmp_path)
    assert isinstance(m.model.layers[0].mlp.up_proj, PackedLinear)


def test_save_load_errors(tmp_path):
    with pytest.raises(ValueError, match='no FakeQuantLinear'): save_quantized(mlp(0), tmp_path / 'a')
    fq = mixed_fake_quant_mlp()
    d = save_quantized(fq, tmp_path / 'b')
    with pytest.raises(ValueError, match='skeleton module'): load_quantized(d)                  # not transformers
    with pytest.raises(ValueError, match='nn.Module skeleton'): load_quantized(d, model='mlp')
    wrong = mlp(0); wrong[2] = nn.Linear(96, 80)
    with pytest.raises(ValueError, match=r'shape \[96, 96\]'): load_quantized(d, wrong)
    with pytest.raises(ValueError, match='no module'): load_quantized(d, nn.Sequential(nn.Linear(64, 96)))
    bigger = nn.Sequential(*mlp(0), nn.Linear(10, 3))
    with pytest.raises(ValueError, match='lacks'): load_quantized(d, bigger)                    # skeleton tensor not in file
    cfg = json.loads((d / CONFIG_NAME).read_text())
    (d / CONFIG_NAME).write_text(json.dumps({**cfg, 'version': 99}))
    with pytest.raises(ValueError, match='version'): load_quantized(d, mlp(0))
    with pytest.raises(ValueError, match='not found'): load_quantized(tmp_path / 'nothing', mlp(0))
    with pytest.raises(ValueError, match='not the layer itself'): save_quantized(FakeQuantLinear.from_linear(nn.Linear(8, 8), 'int4-g8'), tmp_path / 'c')


# ---------------------------------------------------------------- artifact size: dense dtype, packed embedding

def data_bytes(path):
    "Bytes of the tensor data of a safetensors file (the file less its 8-byte length and JSON header)."
    with open(path, 'rb') as f: n = struct.unpack('<Q', f.read(8))[0]
    return path.stat().st_size - 8 - n


def dense_elements(model):
    "Number of floating elements save_quantized stores dense: the state outside the quantized layers (tied once), and their biases."
    layers = {n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    seen, n = set(), 0
    for k, v in model.state_dict().items():
        owner = k.rsplit('.', 1)[0]
        if any(k.startswith(l + '.') for l in layers) and not (owner in layers and k.endswith('.bias')): continue
        if v.data_ptr() in seen: continue
        seen.add(v.data_ptr()); n += v.numel()
    return n


@pytest.mark.parametrize('tie', [True, False])
def test_dense_bf16_bytes_on_disk(tmp_path, tie):
    model = quantize_model(tiny_llama(tie=tie), 'int4-g32')
    a, b = save_quantized(model, tmp_path / 'fp32', dense_dtype=None), save_quantized(model, tmp_path / 'bf16')
    n = dense_elements(model)
    assert n == (128 * 64 * (1 if tie else 2) + 5 * 64)          # embedding (+ lm_head), 2 x 2 norms + final norm
    assert data_bytes(a / WEIGHTS_NAME) - data_bytes(b / WEIGHTS_NAME) == 2 * n   # every dense element: 4 bytes -> 2
    assert (b / WEIGHTS_NAME).stat().st_size < (a / WEIGHTS_NAME).stat().st_size
    dense_keys = set()
    with safe_open(str(a / WEIGHTS_NAME), 'pt') as fa, safe_open(str(b / WEIGHTS_NAME), 'pt') as fb:
        assert set(fa.keys()) == set(fb.keys())
        for k in fa.keys():
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            if k.endswith(('.qweight', '.scale', '.zero', '.global_scale')): assert torch.equal(ta, tb) and ta.dtype == tb.dtype, k
            else:
                assert ta.dtype == torch.float32 and tb.dtype == torch.bfloat16 and torch.equal(ta.bfloat16(), tb), k
                dense_keys.add(k)
    assert sum(model.state_dict()[k].numel() for k in dense_keys) == n
    assert read_quant_config(a)['dense'] == {'dtype': None, 'cast': {}}
    assert read_quant_config(b)['dense'] == {'dtype': 'bfloat16', 'cast': {k: 'float32' for k in dense_keys}}


@pytest.mark.parametrize('tie', [True, False])
def test_dense_bf16_reload_exact(tmp_path, tie):
    "The default artifact equals the fake-quantized model with its dense tensors rounded to bf16 and back, bit for bit."
    model = quantize_model(tiny_llama(tie=tie), 'int4-g32-asym')
    ids = torch.randint(0, 128, (2, 10))
    save_quantized(model, tmp_path)
    m = load_quantized(tmp_path, backend='dequant')
    assert all(v.dtype == torch.float32 for v in m.state_dict().values() if v.is_floating_point())   # cast back
    ref = bf16_dense(copy.deepcopy(model))
    with torch.no_grad(): out, want = m(ids).logits, ref(ids).logits
    assert torch.equal(out, want)
    with torch.no_grad(): assert not torch.equal(out, model(ids).logits)    # the rounding did change something
    rd = round_dense(copy.deepcopy(model))                                 # the library's reference agrees with the test's
    for (k, v), (k2, v2) in zip(rd.state_dict().items(), ref.state_dict().items()): assert k == k2 and torch.equal(v, v2), k


def test_round_dense_refuses_a_tied_quantized_head():
    model = quantize_model(tiny_llama(), 'int4-g32', ignore=())
    with pytest.raises(ValueError, match='dense_dtype=None'): round_dense(model)


@pytest.mark.parametrize('tie', [True, False])
@pytest.mark.parametrize('fmt', ['int8', 'int4-g32', 'int4-g128', 'nf4-g64', 'gguf-q4_0'])
@pytest.mark.parametrize('dense', [None, torch.bfloat16])
def test_embedding_packed_reload_exact(tmp_path, tie, fmt, dense):
    """The artifact with a packed embedding equals the model whose embedding weight is dequantize(quantize(W)) (a tied
    lm_head follows), and whose other dense tensors are rounded as stored, bit for bit."""
    model = quantize_model(tiny_llama(tie=tie), 'int4-g32')
    W = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 128, (2, 10))
    save_quantized(model, tmp_path, dense_dtype=dense, embedding=fmt)
    cfg = read_quant_config(tmp_path)
    spec = QuantSpec.parse(fmt)
    qt = quantize(W, spec)
    packed = pack_qtensor(qt)
    assert cfg['embedding'] == {'key': 'model.embed_tokens.weight', 'module': 'model.embed_tokens', 'spec': str(spec), 'shape': [128, 64],
                                'dtype': 'float32', 'tensors': list(packed)}
    with safe_open(str(tmp_path / WEIGHTS_NAME), 'pt') as f:
        keys = set(f.keys())
        for k, v in packed.items():                                          # the linears' packing, byte for byte
            t = f.get_tensor(f'model.embed_tokens.weight.{k}')
            assert t.dtype == v.dtype and torch.equal(t.view(torch.uint8) if t.dtype.itemsize == 1 else t, v.view(torch.uint8) if v.dtype.itemsize == 1 else v)
    assert 'model.embed_tokens.weight' not in keys and ('lm_head.weight' in keys) != tie
    assert 'model.embed_tokens.weight' not in cfg['dense']['cast']
    m = load_quantized(tmp_path, backend='dequant')
    assert m.model.embed_tokens.weight.dtype == torch.float32 and (m.lm_head.weight is m.model.embed_tokens.weight) == tie
    ref = copy.deepcopy(model)
    if dense is not None: bf16_dense(ref)
    with torch.no_grad(): ref.model.embed_tokens.weight.copy_(dequantize(qt))   # after the rounding: the embedding is not rounded
    assert torch.equal(m.model.embed_tokens.weight, dequantize(qt))
    if tie: assert torch.equal(m.lm_head.weight, dequantize(qt))
    else: assert torch.equal(m.lm_head.weight, ref.lm_head.weight) and not torch.equal(m.lm_head.weight, dequantize(qt))
    with torch.no_grad(): assert torch.equal(m(ids).logits, ref(ids).logits)
    skel = load_quantized(tmp_path, tiny_llama(tie=tie, seed=3), backend='dequant')         # into a skeleton too
    with torch.no_grad(): assert torch.equal(skel(ids).logits, ref(ids).logits)


def test_embedding_packed_beside_a_quantized_tied_head(tmp_path):
    "lm_head quantized (its own format, from the FP32 weight) while the tied embedding is packed in another."
    model = quantize_model(tiny_llama(), 'int4-g32', ignore=())
    W = model.model.embed_tokens.weight.detach().clone()
    save_quantized(model, tmp_path, dense_dtype=None, embedding='int8')
    m = load_quantized(tmp_path, backend='dequant')
    assert isinstance(m.lm_head, PackedLinear) and str(m.lm_head.spec) == 'int4-g32'
    ref = copy.deepcopy(model)
    ref.model.embed_tokens.weight = nn.Parameter(dequantize(quantize(W, 'int8')))   # untied: lm_head keeps its FP32 master
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad(): assert torch.equal(m(ids).logits, ref(ids).logits)


def test_embedding_shrinks_the_file(tmp_path):
    model = quantize_model(tiny_llama(), 'int4-g32')
    sizes = {e: data_bytes(save_quantized(model, tmp_path / str(e), embedding=e) / WEIGHTS_NAME) for e in (None, 'int8', 'int4-g32')}
    n = 128 * 64
    assert sizes[None] - sizes['int8'] == 2 * n - (n + 4 * 128)                       # bf16 -> int8 codes + fp32 row scales
    assert sizes[None] - sizes['int4-g32'] == 2 * n - (n // 2 + 4 * 128 * 2)          # bf16 -> 4-bit codes + fp32 group scales


@pytest.mark.parametrize('bad,msg', [('int8-token', 'activation format'), ('fp8-e4m3-token', 'activation format'),
                                     ('int4-gq', 'embedding: '), ('bogus', 'embedding: '), (4, 'weight format string'),
                                     (True, 'weight format string')])
def test_bad_embedding_refused_before_writing(tmp_path, bad, msg):
    model = quantize_model(tiny_llama(), 'int4-g32')
    with pytest.raises(ValueError, match=msg): save_quantized(model, tmp_path / 'x', embedding=bad)
    assert not (tmp_path / 'x').exists()


def test_bad_dense_dtype_and_no_embedding_refused_before_writing(tmp_path):
    model = quantize_model(tiny_llama(), 'int4-g32')
    for bad in ('int8', torch.int8, torch.float8_e4m3fn, 'uint8', 'nn', 16):
        with pytest.raises(ValueError, match='dense_dtype must be'): save_quantized(model, tmp_path / 'x', dense_dtype=bad)
    with pytest.raises(ValueError, match='0 nn.Embedding'): save_quantized(mixed_fake_quant_mlp(), tmp_path / 'x', embedding='int8')
    two = nn.Sequential(nn.Embedding(10, 64), nn.Embedding(10, 64), *mixed_fake_quant_mlp())
    with pytest.raises(ValueError, match='2 nn.Embedding'): save_quantized(two, tmp_path / 'x', embedding='int8')
    assert not (tmp_path / 'x').exists()


def test_version_1_artifacts_still_load(tmp_path):
    "An artifact of format v1 (no 'dense' or 'embedding' entries, every tensor in its own dtype) loads as before."
    model = quantize_model(tiny_llama(), 'int4-g32')
    save_quantized(model, tmp_path, dense_dtype=None)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    for k in ('dense', 'embedding'): cfg.pop(k)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**cfg, 'version': 1}))
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad(): assert torch.equal(load_quantized(tmp_path, backend='dequant')(ids).logits, model(ids).logits)
