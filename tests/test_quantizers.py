"""Quantizer checks against independent references (pytest): tests/references.py, torch's float8 casts, gguf.quants."""
import math
import gguf
import numpy as np
import pytest
import torch
import torch.nn as nn
from kdq_bench.quantizers import (QuantSpec, quantize, dequantize, fake_quant, quantize_model, fake_quant_layers,
                                  set_quant_enabled, set_quantizer_mode, FakeQuantLinear, DynamicQuantizer, FrozenQuantizer,
                                  LearnedQuantizer, ClipQuantizer, make_quantizer, to_groups, sqnr, NF4_CODEBOOK,
                                  FP4_E2M1_CODEBOOK, ALL_WEIGHT_FORMATS, SQNR_FLOORS_GAUSSIAN)
from kdq_bench.testing import tiny_llama
from references import ref_int, e2m1_ref, brute_step


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_integer_formats_bit_exact(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(7, 96) * torch.rand(7, 1) * 3
    for g in (16, 32, 96):
        spec = QuantSpec('int', bits, 'group', g, sym)
        assert torch.equal(fake_quant(w, spec), ref_int(w, bits, g, sym))
        qt = quantize(w, spec)
        assert int(qt.codes.min()) >= spec.qmin and int(qt.codes.max()) <= spec.qmax
        assert torch.equal(dequantize(qt), fake_quant(w, spec))


def test_short_last_group_and_per_token_activations():
    torch.manual_seed(0)
    w = torch.randn(5, 576)
    a = fake_quant(w, 'int4-g128-asym')
    assert torch.equal(a[:, 512:], fake_quant(w[:, 512:].contiguous(), 'int4-g64-asym'))
    assert torch.equal(a[:, :512], fake_quant(w[:, :512].contiguous(), 'int4-g128-asym'))
    x = torch.randn(2, 3, 64)   # per-token: one scale per (batch, position) row
    y = fake_quant(x, 'int8-token')
    assert torch.equal(y.reshape(6, 64), ref_int(x.reshape(6, 64), 8, 64, True))


def test_fp8_matches_torch_cast_and_is_nearest_on_the_grid():
    torch.manual_seed(0)
    w = torch.randn(64, 64) * 0.05
    for fmt, dt, fmax in [('e4m3', torch.float8_e4m3fn, 448.), ('e5m2', torch.float8_e5m2, 57344.)]:
        s = w.abs().max() / fmax
        y = fake_quant(w, f'fp8-{fmt}')
        assert torch.equal(y, (w / s).to(dt).float() * s)
        # independent: the grid is every finite value of the 256 bit patterns; check nearest
        grid = torch.arange(256, dtype=torch.uint8).view(dt).float()
        grid = torch.unique(grid[torch.isfinite(grid)])
        v = (w / s).flatten()
        nearest_dist = (v[:, None] - grid[None]).abs().min(1).values
        assert torch.allclose((v - (y / s).flatten()).abs(), nearest_dist, atol=1e-6 * fmax)


def test_nf4_is_nearest_codebook_value_times_absmax():
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    y = fake_quant(w, 'nf4-g64').reshape(-1, 64)
    wg = w.reshape(-1, 64)
    s = wg.abs().amax(1, keepdim=True)
    idx = (wg[..., None] / s[..., None] - NF4_CODEBOOK).abs().argmin(-1)
    assert torch.equal(y, NF4_CODEBOOK[idx] * s)
    # QLoRA codebook: 16 sorted values in [-1, 1] with an exact 0, asymmetric (8 positive, 7 negative)
    assert NF4_CODEBOOK[0] == -1 and NF4_CODEBOOK[-1] == 1 and (NF4_CODEBOOK == 0).sum() == 1
    assert (NF4_CODEBOOK > 0).sum() == 8 and torch.all(NF4_CODEBOOK[1:] > NF4_CODEBOOK[:-1])


def test_mxfp4_and_nvfp4_definitions():
    torch.manual_seed(4)
    w = torch.randn(4, 64) * 0.1
    y = fake_quant(w, 'mxfp4')
    for r in range(4):
        for c in range(0, 64, 32):
            g = w[r, c:c + 32]
            X = 2.0 ** (math.floor(math.log2(g.abs().max().item())) - 2)
            assert torch.equal(y[r, c:c + 32], e2m1_ref(g / X) * X)
    y = fake_quant(w, 'nvfp4')
    st = w.abs().max() / (448 * 6)
    for r in range(4):
        for c in range(0, 64, 16):
            g = w[r, c:c + 16]
            sb = (g.abs().max() / (6 * st)).to(torch.float8_e4m3fn).float()
            assert torch.equal(y[r, c:c + 16], e2m1_ref(g / (sb * st)) * (sb * st))
    # scales: MX scales are powers of two, NVFP4 block scales are exact E4M3 values
    sc = quantize(w, 'mxfp4').scale
    assert torch.equal(torch.exp2(torch.log2(sc).round()), sc)
    bs = quantize(w, 'nvfp4').scale
    assert torch.equal(bs.to(torch.float8_e4m3fn).float(), bs)


@pytest.mark.parametrize("fmt", ALL_WEIGHT_FORMATS)
def test_distinct_values_idempotence_and_sqnr_floor(fmt):
    spec = QuantSpec.parse(fmt)
    torch.manual_seed(0)
    w = torch.randn(512, 2048)
    y = fake_quant(w, fmt)
    g = spec.group_size or (w.shape[1] if spec.granularity == 'channel' else w.numel())
    groups = y.reshape(-1, g)[:64]
    assert max(len(torch.unique(row)) for row in groups) <= 2 ** spec.bits
    c1, c2 = quantize(w, fmt).codes, quantize(y, fmt).codes
    if spec.kind == 'fp8': c1, c2 = c1.view(torch.uint8), c2.view(torch.uint8)
    assert torch.equal(c1, c2)
    assert sqnr(w, y) > SQNR_FLOORS_GAUSSIAN[fmt]


def test_string_grammar_and_errors():
    for s in ['int4-g128', 'int4-g128-asym', 'int8', 'int3-g64', 'int2-g64-asym', 'nf4-g64', 'fp8-e4m3',
              'fp8-e5m2', 'fp8-e4m3-ch', 'mxfp4', 'nvfp4', 'int8-token', 'fp8-e4m3-token', 'int4-tensor']:
        assert str(QuantSpec.parse(s)) == s and QuantSpec.parse(str(QuantSpec.parse(s))) == QuantSpec.parse(s)
    for bad in ['int1', 'int9-g128', 'int4-g', 'float4', 'nf3', 'int4-g128-sym']:
        with pytest.raises(ValueError, match='expected one of'): QuantSpec.parse(bad)
    with pytest.raises(ValueError, match='NaN or Inf'): fake_quant(torch.tensor([[0.1, float('nan')]]), 'int4')
    with pytest.raises(ValueError, match='NaN or Inf'): quantize(torch.tensor([[0.1, float('-inf')]]), 'nvfp4')
    w = torch.randn(8, 64)
    for bad in (float('nan'), float('inf'), float('-inf')):   # anywhere in the tensor, in every float dtype the trainer uses
        for dt in (torch.float32, torch.bfloat16):
            x = w.clone().to(dt); x[5, 37] = bad
            with pytest.raises(ValueError, match='NaN or Inf'): LearnedQuantizer.from_weight(w, 'int4-g32')(x)
    with pytest.raises(ValueError, match='clip'): fake_quant(torch.ones(2, 2), 'int4', clip=1.5)
    with pytest.raises(ValueError, match='no nn.Linear'): quantize_model(nn.Sequential(nn.ReLU()), 'int4')


def test_ste_gradients():
    torch.manual_seed(0)
    for fmt in ['int4-g32', 'nf4-g32', 'nvfp4', 'mxfp4', 'fp8-e4m3']:
        x = torch.randn(4, 64, requires_grad=True)
        g = torch.randn(4, 64)
        (fake_quant(x, fmt) * g).sum().backward()
        assert torch.equal(x.grad, g)
    x = torch.randn(4, 64, requires_grad=True)
    fake_quant(x, 'int4-g32', ste='clipped', clip=0.6).sum().backward()
    amax = x.detach().reshape(4, 2, 32).abs().amax(-1, keepdim=True) * 0.6
    s = amax / 7
    v = x.detach().reshape(4, 2, 32)
    inside = ((v >= -8 * s) & (v <= 7 * s)).float().reshape(4, 64)
    assert torch.equal(x.grad, inside) and 0 < inside.mean() < 1


def test_lsq_gradient_matches_paper_and_learned_clip_trains():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    q = LearnedQuantizer.from_weight(w, 'int3-g32')
    assert torch.equal(q(w).detach(), fake_quant(w, 'int3-g32'))
    with torch.no_grad(): q.scale.mul_(0.6)
    q(w).sum().backward()
    v = w.reshape(8, 2, 32) / q.scale.detach().unsqueeze(-1)
    ref = torch.where(v <= -4, torch.full_like(v, -4.), torch.where(v >= 3, torch.full_like(v, 3.), v.round() - v))
    assert torch.allclose(q.scale.grad, ref.sum(-1) / math.sqrt(32 * 3), atol=1e-5)
    # learned clipping lowers the weight-reconstruction error at 2 bits from its unclipped start
    c = ClipQuantizer('int2-g32-asym', w)
    opt = torch.optim.Adam(c.parameters(), lr=0.02)
    start = (c(w) - w).pow(2).mean().item()
    for _ in range(40):
        opt.zero_grad(); loss = (c(w) - w).pow(2).mean(); loss.backward(); opt.step()
    assert loss.item() < start * 0.95


def test_quantize_model_on_llama_keeps_masters_and_trains():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    quantize_model(lm, 'int4-g16', acts='int8-token', ignore=('lm_head', '*.layers.1.mlp.*'))
    names = set(fake_quant_layers(lm))
    assert len(names) == 7 + 4 and not any('layers.1.mlp' in n for n in names)
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items() if k in before)
    lin = lm.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    assert torch.allclose(lin(x), torch.nn.functional.linear(fake_quant(x, 'int8-token'), fake_quant(lin.weight, 'int4-g16')))
    ids = torch.randint(0, 64, (2, 8))
    out = lm(ids, labels=ids)
    out.loss.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    set_quant_enabled(lm, False)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))
    quantize_model(lm, 'int8')   # idempotent: already-swapped layers are left alone
    assert set(fake_quant_layers(lm)) - names == {'model.layers.1.mlp.gate_proj', 'model.layers.1.mlp.up_proj',
                                                   'model.layers.1.mlp.down_proj'}


@pytest.mark.parametrize("fmt", ['int8', 'int4-g128', 'int3-g64-asym', 'int4-tensor', 'nf4-g64', 'fp8-e4m3', 'fp8-e5m2-ch',
                                 'mxfp4', 'nvfp4', 'gguf-q4_0', 'gguf-q8_0'])
def test_compiled_path_matches_eager_bit_for_bit(fmt):
    "The compiled kernel (the default for large, repeatedly quantized tensors): values and STE gradients equal the eager kernel's."
    torch.manual_seed(0)
    w = torch.randn(128, 512)
    assert torch.equal(fake_quant(w, fmt, compiled=True), fake_quant(w, fmt, compiled=False))
    g = torch.randn_like(w)
    grads = []
    for compiled in (True, False):
        x = w.clone().requires_grad_(True)
        y = fake_quant(x, fmt, ste='clipped', clip=0.8, compiled=compiled)
        (y * g).sum().backward()
        grads.append((y.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


# --- llama.cpp's formats against gguf's own reference ----------------------------------------------------------------
@pytest.mark.parametrize("fmt,qtype", [('gguf-q4_0', gguf.GGMLQuantizationType.Q4_0), ('gguf-q8_0', gguf.GGMLQuantizationType.Q8_0)])
def test_gguf_formats_equal_ggml_reference(fmt, qtype):
    torch.manual_seed(0)
    for w in (torch.randn(64, 256) * 0.02, torch.randn(8, 64) * 3, torch.zeros(4, 32), torch.tensor([[1.0] * 16 + [-1.0] * 16])):
        ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)).reshape(w.shape)
        assert torch.equal(fake_quant(w, fmt), ref)
        qt = quantize(w, fmt)
        assert torch.equal(dequantize(qt), ref) and torch.equal(qt.scale.half().float(), qt.scale)
        # the packed bytes agree too: ggml's block = fp16 d then the codes (Q4_0: nibbles q[j] | q[j+16] << 4, q = code + 8)
        raw = gguf.quants.quantize(w.numpy(), qtype).reshape(-1, 18 if fmt == 'gguf-q4_0' else 34)
        d = torch.from_numpy(raw[:, :2].copy().view(np.float16).astype(np.float32)).reshape(qt.scale.shape)
        assert torch.equal(d, qt.scale)
        if fmt == 'gguf-q4_0':
            q = (qt.codes.to(torch.int16) + 8).reshape(-1, 32)
            assert torch.equal(torch.from_numpy(raw[:, 2:].astype(np.int16)), q[:, :16] | (q[:, 16:] << 4))
        else: assert torch.equal(torch.from_numpy(raw[:, 2:].copy().view(np.int8).astype(np.int16)), qt.codes.to(torch.int16).reshape(-1, 32))
    assert str(QuantSpec.parse(fmt)) == fmt and QuantSpec.parse(fmt).group_size == 32


# --- the quantizer kinds ---------------------------------------------------------------------------------------------
GRID_FORMATS = ['int8', 'int4', 'int4-g32', 'int4-g128-asym', 'int3-g64', 'int2-g64-asym', 'int4-tensor', 'nf4-g64', 'mxfp4', 'nvfp4',
                'fp8-e4m3', 'fp8-e5m2', 'fp8-e4m3-ch', 'gguf-q4_0', 'gguf-q8_0']


@pytest.mark.parametrize('fmt', GRID_FORMATS)
def test_grid_step_against_brute_force(fmt):
    w = torch.randn(6, 160, generator=torch.Generator().manual_seed(0)) * 0.05
    torch.testing.assert_close(DynamicQuantizer(fmt).grid_step(w), brute_step(w, fmt), rtol=1e-6, atol=0)


@pytest.mark.parametrize('fmt', GRID_FORMATS + ['int4-asym', 'int3-g48', 'nf4-g32'])
def test_every_mode_exports_exactly_what_it_computes(fmt):
    "qtensor(w) decodes to quantizer(w) bit for bit for every mode and format it supports, before and after the grid moves."
    torch.manual_seed(1)
    w = torch.randn(32, 192) * 0.05
    spec = QuantSpec.parse(fmt)
    modes = ['dynamic', 'frozen'] + (['learned'] if spec.kind in ('int', 'gguf') else []) + (['clip'] if spec.is_integer else [])
    for mode in modes:
        q = make_quantizer(mode, fmt, w)
        # every mode starts on round-to-nearest's grid (learned ggml scales quantize with the fp16 d: compare on the grid)
        x = fake_quant(w, fmt) if (mode, spec.kind) == ('learned', 'gguf') else w
        assert torch.equal(q(x), fake_quant(x, fmt)), mode
        with torch.no_grad():
            for p in q.parameters(): p.mul_(1 + 0.2 * torch.rand_like(p))   # as if trained
        w2 = w + 0.01 * torch.randn_like(w)
        assert torch.equal(dequantize(q.qtensor(w2)), q(w2).detach()), mode


@pytest.mark.parametrize('fmt', ['int4-g32-asym', 'gguf-q4_0', 'gguf-q8_0'])
def test_learned_scales_gradients_and_round_trip(fmt):
    "Scales (and zero points) receive the LSQ gradient; the weight gradient is zero outside the grid; gguf scales stay fp16."
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    q = LearnedQuantizer.from_weight(w, fmt)
    with torch.no_grad(): q.scale.mul_(0.7)
    x = w.clone().requires_grad_(True)
    g = torch.rand_like(w) + 0.5
    (q(x) * g).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0
    if q.zero is not None: assert q.zero.grad is not None and q.zero.grad.abs().sum() > 0
    lo, hi = (-8, 7) if fmt == 'gguf-q4_0' else (-127, 127) if fmt == 'gguf-q8_0' else (0, 15)
    qp = q.qparams()
    u = to_groups(w, q.spec)[0] / qp.scale.detach() + (0 if qp.zero is None else qp.zero.detach())
    outside = ((u < lo) | (u > hi)).reshape(w.shape)
    assert outside.any() and torch.all(x.grad[outside] == 0) and torch.allclose(x.grad[~outside], g[~outside], rtol=1e-6)
    qt = q.qtensor(w)
    if fmt.startswith('gguf'): assert torch.equal(qt.scale.half().float(), qt.scale)
    assert torch.equal(dequantize(qt), q(w).detach())
    # a learned quantizer started from a frozen (e.g. GPTQ) grid reproduces that grid
    fz = FrozenQuantizer.from_qtensor(quantize(w * 1.1, fmt))   # a grid given by its QTensor, as PTQ gives it
    assert torch.equal(LearnedQuantizer.from_qtensor(fz.qtensor(w))(w).detach(), fz(w))


def test_set_quantizer_mode_keeps_the_function_and_modes_refuse_bad_input():
    lm = tiny_llama(vocab=64, hidden=32, layers=2)
    ids = torch.randint(0, 64, (2, 12))
    quantize_model(lm, 'int4-g16-asym')
    with torch.no_grad(): ref = lm(ids).logits
    for mode in ('frozen', 'learned', 'dynamic'):
        set_quantizer_mode(lm, mode)
        assert all(m.weight_quantizer.mode == mode for m in fake_quant_layers(lm).values())
        with torch.no_grad(): assert torch.equal(lm(ids).logits, ref), mode
    with pytest.raises(ValueError, match='no FakeQuantLinear'): set_quantizer_mode(nn.Sequential(nn.Linear(4, 4)), 'learned')
    with pytest.raises(ValueError, match='quantizer mode'): make_quantizer('lsq', 'int4', torch.randn(4, 8))
    with pytest.raises(ValueError, match='integer or gguf'): LearnedQuantizer.from_weight(torch.randn(4, 64), 'nf4')
    with pytest.raises(ValueError, match='does not fit'): FrozenQuantizer.from_weight(torch.randn(4, 64), 'int4-g32')(torch.randn(4, 32))
    with pytest.raises(ValueError, match='activations per token'): DynamicQuantizer('int8-token')


def test_bad_groups_and_dtypes_fail_before_work():
    with pytest.raises(ValueError, match='up to'): QuantSpec.parse('int4-g100000000000')
    w = torch.randn(4, 64)
    assert torch.equal(fake_quant(w, 'int4-g16777216'), fake_quant(w, 'int4'))   # a group beyond the row is the row: no allocation
    with pytest.raises(ValueError, match='floating-point'): quantize(torch.arange(64).reshape(2, 32), 'int4')
    with pytest.raises(ValueError, match='floating-point'): fake_quant(torch.ones(2, 32, dtype=torch.int32), 'int8')
