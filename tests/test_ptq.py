"""Tests of kdq_bench.ptq: RTN, GPTQ, AWQ and SmoothQuant against independent reference formulas."""
import copy, math
import pytest
import torch
import torch.nn as nn
from kdq_bench import export, testing
from kdq_bench.quantizers import (QuantSpec, FrozenQuantizer, fake_quant, quantize, dequantize, qparams, ALL_WEIGHT_FORMATS,
                                  fake_quant_layers, quantize_model)
from kdq_bench.models import decoder_layers
from kdq_bench.ptq import (rtn, gptq, gptq_quantize_weight, output_error, awq, smoothquant, smooth_scales,
                           fold_scales, ptq, layer_errors, layer_inputs, _clip_search, _awq_search, PTQ_METHODS)

torch.set_num_threads(1)


def tiny(seed=0, kv=2, layers=2, hidden=64, inter=160, heads=4):
    "The testing Llama with non-trivial norm weights."
    m = testing.tiny_llama(vocab=256, hidden=hidden, layers=layers, intermediate=inter, heads=heads, kv_heads=kv, seed=seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1: p.add_(torch.randn_like(p) * 0.2)
    for p in m.parameters(): p.requires_grad_(False)
    return m


def calib_tokens(n=12, seq=32, seed=1):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def on_grid(layer):
    "The master weight is exactly what the layer's frozen quantizer makes of it, and its codes sit in the format's range."
    w = layer.weight.detach()
    assert torch.equal(layer.quantized_weight(), w)
    qt = layer.weight_quantizer.qtensor(w)
    assert torch.equal(dequantize(qt), w)
    if qt.spec.is_integer:
        assert int(qt.codes.min()) >= qt.spec.qmin and int(qt.codes.max()) <= qt.spec.qmax


# ---------------------------------------------------------------- FrozenQuantizer
FORMATS = ALL_WEIGHT_FORMATS + ['int4-asym', 'int8-asym', 'int4-tensor', 'int3-g48', 'nf4-g32']

@pytest.mark.parametrize('fmt', FORMATS)
def test_fixed_quantizer_matches_rtn_and_is_idempotent(fmt):
    torch.manual_seed(0)
    w = torch.randn(24, 96) * 0.1
    w[:, 3] *= 20
    fq = FrozenQuantizer.from_weight(w, fmt)
    y = fq(w)
    assert torch.equal(y, fake_quant(w, fmt))            # frozen absmax scales == the library's RTN
    assert torch.equal(fq(y), y)                          # on the grid: quantizing again changes nothing
    qt = fq.qtensor(y)
    assert torch.equal(dequantize(qt), y)
    ref = quantize(w, fmt)
    assert torch.equal(qt.codes, ref.codes) and torch.equal(qt.scale, ref.scale)


def test_fixed_quantizer_ste_and_errors():
    w = torch.randn(8, 32, requires_grad=True)
    fq = FrozenQuantizer.from_weight(w.detach(), 'int4-g16')
    fq(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    with pytest.raises(ValueError, match='does not fit'): fq(torch.randn(8, 64))
    with pytest.raises(ValueError, match='zero point'): FrozenQuantizer('int4-asym', torch.ones(8, 1))
    with pytest.raises(ValueError, match='activation'): FrozenQuantizer('int8-token', torch.ones(8, 1))
    fq.enabled = False
    assert fq(w) is w


def test_asymmetric_rtn_is_not_idempotent_under_absmax_so_scales_are_frozen():
    "Why FrozenQuantizer exists: the dynamic min/max quantizer re-derives other scales from an asym RTN weight."
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    y = fake_quant(w, 'int4-g128-asym')
    assert not torch.equal(fake_quant(y, 'int4-g128-asym'), y)
    assert torch.equal(FrozenQuantizer.from_weight(w, 'int4-g128-asym')(y), y)


# ---------------------------------------------------------------- RTN
@pytest.mark.parametrize('fmt', ALL_WEIGHT_FORMATS)
def test_rtn_every_format(fmt):
    m = tiny()
    orig = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    rtn(m, fmt)
    layers = fake_quant_layers(m)
    assert set(layers) == set(orig) - {'lm_head'}
    assert type(m.lm_head) is nn.Linear
    for n, l in layers.items():
        assert torch.equal(l.weight.detach(), fake_quant(orig[n], fmt))
        on_grid(l)


def test_rtn_export_is_exact():
    m = rtn(tiny(), 'int4-g32-asym')
    for l in fake_quant_layers(m).values():
        packed = export.export_linear(l, verify=True)           # raises if the packed weight differs by one bit
        assert packed


def test_rtn_bad_input():
    with pytest.raises(ValueError, match='unknown quantization format'): rtn(tiny(), 'int9')
    with pytest.raises(ValueError, match='activations'): rtn(tiny(), 'int8-token')
    with pytest.raises(ValueError, match='already holds FakeQuantLinear'): rtn(quantize_model(tiny()), 'int4')
    with pytest.raises(ValueError, match='no nn.Linear'): rtn(tiny(), 'int4', ignore=('*',))


# ---------------------------------------------------------------- GPTQ
def reference_gptq(W, H, spec, blocksize=128, percdamp=.01, groupsize=-1, actorder=False, static_groups=False):
    "Straightforward port of GPTQ.fasterquant (IST-DASLab/gptq), with the quantizer library's scales and grid."
    spec = QuantSpec.parse(spec)
    W, H = W.clone().float(), H.clone().float()
    cols = W.shape[1]
    def find_params(x):
        qp = qparams(x.unsqueeze(1), spec)
        return qp.scale.view(-1, 1), None if qp.zero is None else qp.zero.view(-1, 1)
    def quant(x, s, z):
        q = torch.round(x / s)
        if z is not None: q = q + z
        q = torch.clamp(q, spec.qmin, spec.qmax)
        return (q - z) * s if z is not None else q * s
    scale, zero = find_params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [find_params(W[:, i:i + groupsize]) for i in range(0, cols, groupsize)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(cols)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), torch.zeros(W.shape[0], i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0: scale, zero = find_params(W[:, (i1 + i):(i1 + i + groupsize)])
                else:
                    idx = i1 + i
                    if actorder: idx = perm[idx]
                    scale, zero = groups[idx // groupsize]
            q = quant(w.unsqueeze(1), scale, zero).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q[:, invperm] if actorder else Q


def problem(out_f=48, in_f=256, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, in_f, generator=g) @ (0.3 * torch.randn(in_f, in_f, generator=g) + torch.eye(in_f))
    X[:, :3] *= 8                                                   # a few outlier channels
    return 0.05 * torch.randn(out_f, in_f, generator=g), 2 * X.T @ X / n


@pytest.mark.parametrize('fmt,kw,ref_kw', [
    ('int4-g128', {}, dict(groupsize=128)),
    ('int4-g128-asym', {}, dict(groupsize=128)),
    ('int3-g32', dict(blocksize=32), dict(groupsize=32, blocksize=32)),
    ('int3-g256', {}, dict(groupsize=256)),                       # a group spanning two blocks
    ('int4', {}, dict(groupsize=-1)),
    ('int4-asym', {}, dict(groupsize=-1)),
    ('int4-g64', dict(static_groups=True), dict(groupsize=64, static_groups=True)),
    ('int4-g64-asym', dict(act_order=True), dict(groupsize=64, static_groups=True, actorder=True)),
    ('int2-g64', dict(act_order=True, percdamp=0.1), dict(groupsize=64, static_groups=True, actorder=True, percdamp=0.1)),
])
def test_gptq_matches_reference_port(fmt, kw, ref_kw):
    W, H = problem()
    Q, fq = gptq_quantize_weight(W, H, fmt, **kw)
    R = reference_gptq(W, H, fmt, **ref_kw)
    assert torch.equal(Q, R)
    assert torch.equal(fq(Q), Q)
    assert output_error(W, Q, H) < output_error(W, fake_quant(W, fmt), H)


def test_gptq_group_scales_use_error_updated_weights():
    "Groups smaller than the block: scales come from the fully updated columns (the GPTQ repository reads partly stale"
    "ones), so the result does not depend on the block size beyond float rounding, unlike the reference port's."
    W, H = problem()
    Q32, _ = gptq_quantize_weight(W, H, 'int4-g32', blocksize=32)
    assert torch.equal(Q32, reference_gptq(W, H, 'int4-g32', blocksize=32, groupsize=32))   # aligned: identical
    for bs in (8, 64, 128, 256):
        Q, _ = gptq_quantize_weight(W, H, 'int4-g32', blocksize=bs)
        assert torch.allclose(Q, Q32, rtol=1e-5, atol=1e-7), bs         # same codes; scales equal to float rounding
    R128 = reference_gptq(W, H, 'int4-g32', blocksize=128, groupsize=32)
    assert not torch.allclose(R128, Q32, rtol=1e-5, atol=1e-7)           # the reference's stale group scales differ


def test_gptq_matches_llmcompressor():
    "llmcompressor's GPTQ takes observer (static) scales: compare with static_groups / act_order, bit for bit."
    import llmcompressor.modifiers.gptq.gptq_quantize as qmod   # installed by .ci/run (--no-deps: it pins an older transformers)
    from compressed_tensors.quantization import QuantizationArgs
    W, H = problem()
    for fmt, act in [('int4-g128', False), ('int4-g64-asym', True), ('int4', False)]:
        spec = QuantSpec.parse(fmt)
        Q, fq = gptq_quantize_weight(W, H, fmt, static_groups=True, act_order=act)
        zp = torch.zeros_like(fq.scale) if spec.symmetric else fq.zero - 2 ** (spec.bits - 1)  # its signed zero points
        args = QuantizationArgs(num_bits=spec.bits, type='int', symmetric=spec.symmetric,
                                strategy='group' if spec.granularity == 'group' else 'channel',
                                group_size=spec.group_size, actorder='static' if act else None)
        R = qmod.quantize_weight(W[None].clone(), H[None].clone(), fq.scale[None].clone(), zp[None].clone(), None, args)[0][0]
        assert torch.equal(Q, R), fmt


def test_gptq_bad_input():
    W, H = problem(8, 64)
    for fmt in ('nf4', 'fp8-e4m3', 'mxfp4', 'nvfp4'):
        with pytest.raises(ValueError, match='GPTQ supports integer weight formats'): gptq_quantize_weight(W, H, fmt)
        with pytest.raises(ValueError, match="int4-g128"): gptq(tiny(), calib_tokens(), fmt)
    with pytest.raises(ValueError, match='expected W'): gptq_quantize_weight(W, H[:3, :3], 'int4')
    with pytest.raises(ValueError, match='LongTensor'): gptq(tiny(), torch.randn(4, 8), 'int4')
    with pytest.raises(ValueError, match='NaN'): gptq_quantize_weight(W * float('nan'), H, 'int4')


def test_gptq_hessian_from_layer_inputs():
    "The Hessian of layer 0's q_proj is 2/N·XᵀX of the RMS-normed embeddings, computed here independently."
    m, calib = tiny(), calib_tokens()
    x = m.model.layers[0].input_layernorm(m.model.embed_tokens(calib)).reshape(-1, 64)
    H = 2 * x.T @ x / x.shape[0]
    rep = []
    q = gptq(copy.deepcopy(m), calib, 'int4-g32', report=rep, progress=False)
    W = m.model.layers[0].self_attn.q_proj.weight
    Q, _ = gptq_quantize_weight(W, H, 'int4-g32')
    assert torch.allclose(q.model.layers[0].self_attn.q_proj.weight, Q, atol=1e-6)


def test_gptq_model_beats_rtn_and_is_on_grid():
    m, calib = tiny(), calib_tokens()
    for fmt in ('int4-g32', 'int3-g32-asym', 'int4'):
        rep = []
        q = gptq(copy.deepcopy(m), calib, fmt, report=rep, progress=False)
        assert len(rep) == 2 * 7
        for r in rep: assert r['gptq'] < r['rtn'], r
        for l in fake_quant_layers(q).values(): on_grid(l)
        assert type(q.lm_head) is nn.Linear


def test_gptq_sequential_inputs_are_quantized_outputs():
    "Layer 1 is calibrated on layer 0's quantized outputs: redoing it by hand from those inputs gives the same weights."
    m, calib = tiny(), calib_tokens()
    q = gptq(copy.deepcopy(m), calib, 'int4-g32', progress=False)
    xs, kws = layer_inputs(q, calib, batch_size=8)
    with torch.no_grad():
        h = [q.model.layers[0](x, **kw) for x, kw in zip(xs, kws)]
        x = torch.cat([q.model.layers[1].input_layernorm(t) for t in h]).reshape(-1, 64)
    H = 2 * x.T @ x / x.shape[0]
    Q, _ = gptq_quantize_weight(m.model.layers[1].self_attn.k_proj.weight, H, 'int4-g32')
    assert torch.allclose(q.model.layers[1].self_attn.k_proj.weight, Q, atol=1e-6)


# ---------------------------------------------------------------- AWQ
@pytest.mark.parametrize('kv', [4, 2, 1])
def test_awq_scaling_keeps_fp_outputs(kv):
    m, calib = tiny(kv=kv), calib_tokens()
    ref = m(calib).logits
    s = awq(copy.deepcopy(m), calib, 'int3-g32', scale_only=True, progress=False)
    out = s(calib).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    changed = [n for n, p in s.named_parameters() if not torch.equal(p, dict(m.named_parameters())[n])]
    assert any('input_layernorm' in n for n in changed) and any('v_proj' in n for n in changed) and any('up_proj' in n for n in changed)


def test_fold_scales_gqa_layout():
    "v_proj channel (kv, d) feeds o_proj columns (h, d) for every query head h of KV head kv = h // repeat."
    m = tiny(kv=2)
    a = m.model.layers[0].self_attn
    x = torch.randn(5, 64)
    vo = lambda: a.o_proj(a.v_proj(x).view(5, 2, 1, 16).expand(5, 2, 2, 16).reshape(5, 64))   # HF repeat_kv layout
    ref = vo()
    s = torch.rand(32) + 0.5
    with torch.no_grad(): fold_scales(a.v_proj, [a.o_proj], s, gqa=(2, 2))
    out = vo()
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='positive'): fold_scales(a.v_proj, [a.o_proj], -s, gqa=(2, 2))


def test_clip_search_picks_best_ratio_per_group():
    torch.manual_seed(0)
    W, X = torch.randn(6, 64), torch.randn(100, 64)
    W[:, 0] *= 6
    Wc, ratio = _clip_search(W, X, QuantSpec.parse('int3-g32'), n_grid=10, max_shrink=0.5)
    for o in range(6):
        for g in range(2):
            sl = slice(32 * g, 32 * g + 32)
            def err(r):
                w = W.clone(); m = W[o, sl].abs().max() * r
                w[o, sl] = W[o, sl].clamp(-m, m)
                return (X[:, sl] @ (fake_quant(w, 'int3-g32')[o, sl] - W[o, sl])).pow(2).mean().item()
            errs = [err(1 - i / 10) for i in range(5)]
            assert ratio[o, g].item() == pytest.approx(1 - errs.index(min(errs)) / 10)
            assert torch.equal(Wc[o, sl], W[o, sl].clamp(-W[o, sl].abs().max() * ratio[o, g], W[o, sl].abs().max() * ratio[o, g]))


@pytest.mark.parametrize('fmt', ['int4-g32', 'int3-g32-asym', 'nf4'])
def test_awq_lone_linear_search_equals_direct_output_error(fmt):
    "For o/down the search takes its errors from the inputs' Gram matrix: the same errors (and α) as running the linear on every token."
    torch.manual_seed(0)
    lin = nn.Linear(96, 48, bias=True).requires_grad_(False)
    feats = [torch.randn(3, 20, 96) * (torch.rand(96) * 4 + 0.1), torch.randn(2, 20, 96) * (torch.rand(96) * 4 + 0.1)]
    kws = [{}, {}]
    spec = QuantSpec.parse(fmt)
    s_gram, a_gram, e_gram = _awq_search(lin, [lin], feats, kws, spec, 10)
    s_dir, a_dir, e_dir = _awq_search(lambda x, kw: lin(x), [lin], feats, kws, spec, 10)
    assert e_gram == pytest.approx(e_dir, rel=1e-4) and a_gram == a_dir and torch.equal(s_gram, s_dir)
    assert len(set(e_dir)) == 10                                     # the grid points differ: the check compares something


@pytest.mark.parametrize('fmt', ['int4-g32', 'int3-g32-asym', 'nf4', 'mxfp4'])
def test_awq_result_on_grid_and_better_than_rtn(fmt):
    m, calib = tiny(), calib_tokens()
    rep = []
    qa = awq(copy.deepcopy(m), calib, fmt, report=rep, progress=False)
    assert {r['group'] for r in rep} == {'qkv', 'v->o', 'gate,up', 'up->down'}
    for r in rep: assert r['awq'] <= r['rtn'] and 0 <= r['alpha'] < 1
    for l in fake_quant_layers(qa).values(): on_grid(l)
    ea = layer_errors(m, qa, calib, progress=False)
    er = layer_errors(m, rtn(copy.deepcopy(m), fmt), calib, progress=False)
    assert sum(r['block'] for r in ea) < sum(r['block'] for r in er)


def test_awq_needs_llama_layers():
    class Block(nn.Module):
        def __init__(self): super().__init__(); self.fc = nn.Linear(8, 8)
        def forward(self, x, **kw): return self.fc(x)
    class Net(nn.Module):
        def __init__(self): super().__init__(); self.emb = nn.Embedding(10, 8); self.layers = nn.ModuleList([Block(), Block()])
        def forward(self, input_ids, **kw):
            x = self.emb(input_ids)
            for l in self.layers: x = l(x)
            return x
    with pytest.raises(ValueError, match='Llama-style'): awq(Net(), calib_tokens().clamp(max=9), 'int4')
    q = gptq(Net(), calib_tokens().clamp(max=9), 'int4', progress=False)   # GPTQ only needs linears in a layer list
    assert len(fake_quant_layers(q)) == 2


# ---------------------------------------------------------------- SmoothQuant
def test_smooth_scales_formula():
    torch.manual_seed(0)
    act, w1, w2 = torch.rand(16) * 10, torch.randn(4, 16), torch.randn(3, 16)
    s = smooth_scales(act, [w1, w2], 0.5)
    wmax = torch.maximum(w1.abs().max(0).values, w2.abs().max(0).values)
    assert torch.allclose(s, (act.sqrt() / wmax.sqrt()))
    # alpha = 0.5 equalises the ranges: max|X_j/s_j| == max|W_j·s_j|
    assert torch.allclose(act / s, wmax * s, rtol=1e-5)


def test_smoothquant():
    m, calib = tiny(), calib_tokens()
    ref = m(calib).logits
    s = smoothquant(copy.deepcopy(m), calib, alpha=0.8, scale_only=True, progress=False)
    assert ((s(calib).logits - ref).norm() / ref.norm()).item() < 1e-5
    rep = []
    q = smoothquant(copy.deepcopy(m), calib, report=rep, progress=False)
    assert len(rep) == 4 and all(r['act_max_smoothed'] < r['act_max'] for r in rep)
    layers = fake_quant_layers(q)
    assert len(layers) == 14 and all(str(l.a_spec) == 'int8-token' and str(l.w_spec) == 'int8' for l in layers.values())
    for l in layers.values(): on_grid(l)
    err = layer_errors(m, q, calib, progress=False)
    assert all(r['block'] < 1e-2 for r in err)
    with pytest.raises(ValueError, match='alpha'): smoothquant(tiny(), calib, alpha=1.5)


# ---------------------------------------------------------------- dispatcher, errors, helpers
def test_ptq_dispatch_and_errors():
    m, calib = tiny(), calib_tokens()
    assert PTQ_METHODS == ('rtn', 'gptq', 'awq', 'smoothquant')
    with pytest.raises(ValueError, match="unknown PTQ method 'spqr'"): ptq(m, 'spqr', calib)
    with pytest.raises(ValueError, match='needs calibration tokens'): ptq(m, 'gptq')
    q = ptq(copy.deepcopy(m), 'smoothquant', calib, progress=False)
    assert str(next(iter(fake_quant_layers(q).values())).w_spec) == 'int8'
    q = ptq(copy.deepcopy(m), 'rtn', weights='nf4')
    assert str(next(iter(fake_quant_layers(q).values())).w_spec) == 'nf4-g64'


def test_layer_errors_zero_for_identical_models():
    m, calib = tiny(), calib_tokens()
    for r in layer_errors(m, copy.deepcopy(m), calib, progress=False):
        assert r['attn'] == 0 and r['mlp'] == 0 and r['block'] == 0
    with pytest.raises(ValueError, match='decoder layers'): layer_errors(m, tiny(layers=3), calib, progress=False)


def test_decoder_layers():
    name, layers = decoder_layers(tiny(layers=3))
    assert name == 'model.layers' and len(layers) == 3
    with pytest.raises(ValueError, match='decoder layers'): decoder_layers(nn.Linear(3, 3))


# ---------------------------------------------------------------- other references on CPU
def test_nf4_matches_bitsandbytes():
    import bitsandbytes.functional as bnbf
    torch.manual_seed(0)
    w = torch.randn(128, 512)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type='nf4')
    assert torch.equal(bnbf.dequantize_4bit(packed, state), fake_quant(w, 'nf4-g64'))
    assert torch.equal(state.absmax.float(), quantize(w, 'nf4-g64').scale.reshape(-1))


def test_int4_asym_matches_hqq_minmax():
    "HQQ without its optimiser and with rounded zeros is min/max asymmetric RTN: same codes except at rounding ties."
    import hqq.core.quantize as hq
    torch.manual_seed(0)
    w = torch.randn(128, 512)
    codes, meta = hq.Quantizer.quantize(w, nbits=4, channel_wise=True, group_size=64, optimize=False, round_zero=True,
                                         axis=1, bitpack=False, compute_dtype=torch.float32, device='cpu')
    qt = quantize(w, 'int4-g64-asym')
    diff = codes.reshape(w.shape).long() - qt.codes.long()
    assert torch.equal(meta['zero'].reshape(-1), qt.zero.reshape(-1).float())
    assert torch.allclose(meta['scale'].reshape(-1), qt.scale.reshape(-1), rtol=1e-6)
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 1e-4


def test_methods_run_in_eval_mode_and_restore_the_mode():
    m, calib = tiny(), calib_tokens()
    m.config.attention_dropout = 0.5
    for layer in m.model.layers: layer.self_attn.attention_dropout = 0.5
    ref = gptq(copy.deepcopy(m), calib, 'int4-g32', progress=False)
    m.train()
    q = gptq(m, calib, 'int4-g32', progress=False)            # dropout would make the Hessians random
    assert q.training
    for (n, a), b in zip(fake_quant_layers(q).items(), fake_quant_layers(ref).values()):
        assert torch.equal(a.weight, b.weight), n
