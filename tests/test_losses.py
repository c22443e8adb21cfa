"Tests of kdq_bench.losses against independent float64 formulas (CPU, seconds)."
import math, warnings
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from kdq_bench.losses import (DIVERGENCES, TopKLogits, distill_loss, teacher_confidence, row_losses, auto_chunk, shift_targets,
                              causal_lm_loss, feature_loss, layer_quant_error, quant_penalty, soft_target_entropy,
                              check_soft_targets, entropy_sweep, LossSchedule, JointLoss)
from kdq_bench.quantizers import (quantize_model, quantize, dequantize, fake_quant, fake_quant_layers, set_quant_enabled,
                                  NF4_CODEBOOK, FP4_E2M1_CODEBOOK)
from kdq_bench.hooks import FeatureCapture, layer_pairs, build_projectors, pair_key
from references import brute_step

torch.set_num_threads(1)


# --- references --------------------------------------------------------------------------------------------------------
def ref_kl(p, q): return (p * (p.log() - q.log())).sum(-1)

def ref_div(s, t, kind, tau, beta=0.3):
    "Unchunked float64 textbook formulas, per token."
    ps, pt = torch.softmax(s.double() / tau, -1), torch.softmax(t.double() / tau, -1)
    if kind == 'forward_kl': return ref_kl(pt, ps)
    if kind == 'reverse_kl': return ref_kl(ps, pt)
    if kind == 'js': m = (ps + pt) / 2; return 0.5 * ref_kl(ps, m) + 0.5 * ref_kl(pt, m)
    return beta * ref_kl(ps, pt) + (1 - beta) * ref_kl(pt, ps)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 7, 19, generator=g) * 3, torch.randn(3, 7, 19, generator=g) * 3


@pytest.fixture
def mask():
    m = torch.ones(3, 7, dtype=torch.bool); m[0, 5:] = False; m[2, :2] = False
    return m


# --- divergences -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kind', DIVERGENCES)
@pytest.mark.parametrize('tau', [1.0, 2.5, 4.0])
def test_divergence_matches_reference(logits, mask, kind, tau):
    S, T = logits
    got = distill_loss(S, T, kind, tau, mask=mask, beta=0.3, chunk_size=4)
    want = tau ** 2 * ref_div(S[mask], T[mask], kind, tau).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize('kind', DIVERGENCES)
def test_float64_inputs_are_exact(logits, kind):
    S, T = (x.double() for x in logits)
    got = distill_loss(S, T, kind, 3.0, beta=0.3, reduction='none')
    torch.testing.assert_close(got, 9 * ref_div(S, T, kind, 3.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('kind', DIVERGENCES)
def test_chunked_equals_unchunked_values_and_grads(logits, mask, kind):
    S, T = logits
    outs = []
    for chunk in (1, 5, 10_000):
        s = S.clone().requires_grad_()
        l = distill_loss(s, T, kind, 2.0, mask=mask, chunk_size=chunk, beta=0.4)
        l.backward(); outs.append((l.detach(), s.grad))
    for l, g in outs[1:]:
        torch.testing.assert_close(l, outs[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g, outs[0][1], rtol=1e-5, atol=1e-8)
    # the autograd-unchunked reference gradient
    s = S.clone().double().requires_grad_()
    (4 * ref_div(s[mask], T.double()[mask], kind, 2.0, beta=0.4).mean()).backward()
    torch.testing.assert_close(outs[0][1].double(), s.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('kind', DIVERGENCES)
def test_masking_and_labels(logits, mask, kind):
    S, T = logits
    labels = torch.where(mask, 3, -100)
    a = distill_loss(S, T, kind, 2.0, mask=mask, beta=0.5)
    assert distill_loss(S, T, kind, 2.0, labels=labels, beta=0.5).item() == pytest.approx(a.item(), rel=1e-6)
    # masked positions do not matter at all, whatever their values
    S2, T2 = S.clone(), T.clone(); S2[~mask] = 1e4; T2[~mask] = -1e4
    assert distill_loss(S2, T2, kind, 2.0, mask=mask, beta=0.5).item() == pytest.approx(a.item(), rel=1e-6)
    per = distill_loss(S, T, kind, 2.0, mask=mask, beta=0.5, reduction='none')
    assert per.shape == mask.shape and (per[~mask] == 0).all()
    assert distill_loss(S, T, kind, 2.0, mask=mask, beta=0.5, reduction='sum').item() == pytest.approx(per.sum().item(), rel=1e-6)
    # no valid position: 0 with a gradient path
    s = S.clone().requires_grad_()
    z = distill_loss(s, T, kind, 2.0, mask=torch.zeros_like(mask), beta=0.5); z.backward()
    assert z.item() == 0 and (s.grad == 0).all()


def test_tau_squared_scaling(logits):
    S, T = logits
    for tau in (1.0, 2.0, 5.0):
        per = distill_loss(S, T, 'forward_kl', tau, reduction='none')
        torch.testing.assert_close(per.double(), tau ** 2 * ref_div(S, T, 'forward_kl', tau), rtol=1e-5, atol=1e-6)
    # high-τ limit: τ²·KL → mean over tokens of Var-like quadratic form ½·Var_u(z_S - z_T)/1 (uniform u), independent of τ
    d = (S - T).double()
    limit = 0.5 * (d - d.mean(-1, keepdim=True)).pow(2).mean(-1).mean()
    assert distill_loss(S, T, 'forward_kl', 1000.0).item() == pytest.approx(limit.item(), rel=1e-2)


def test_js_symmetry_and_bounds(logits):
    S, T = logits
    a, b = distill_loss(S, T, 'js', 1.0, reduction='none'), distill_loss(T, S, 'js', 1.0, reduction='none')
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert (a >= 0).all() and (a <= math.log(2) + 1e-6).all()
    # disjoint supports reach log 2
    s = torch.full((1, 4), -1e4); s[0, 0] = 0; t = torch.full((1, 4), -1e4); t[0, 1] = 0
    assert distill_loss(s, t, 'js', 1.0).item() == pytest.approx(math.log(2), rel=1e-6)
    assert distill_loss(S, S, 'js', 1.0).item() == pytest.approx(0, abs=1e-6)


def test_cakld_limits_and_beta_rule(logits, mask):
    S, T = logits
    f, r = distill_loss(S, T, 'forward_kl', 2.0, mask=mask), distill_loss(S, T, 'reverse_kl', 2.0, mask=mask)
    assert distill_loss(S, T, 'cakld', 2.0, mask=mask, beta=0.0).item() == pytest.approx(f.item(), rel=1e-6)
    assert distill_loss(S, T, 'cakld', 2.0, mask=mask, beta=1.0).item() == pytest.approx(r.item(), rel=1e-6)
    assert distill_loss(S, T, 'cakld', 2.0, mask=mask, beta=0.25).item() == pytest.approx(0.25 * r.item() + 0.75 * f.item(), rel=1e-5)
    # β rule: mean teacher probability (τ = 1) of the label token, else of its top token
    p = torch.softmax(T.double(), -1)
    labels = torch.randint(0, 19, (3, 7), generator=torch.Generator().manual_seed(3)).masked_fill(~mask, -100)
    want = p.gather(-1, labels.clamp_min(0)[..., None])[..., 0][mask].mean().item()
    assert teacher_confidence(T, labels) == pytest.approx(want, rel=1e-6)
    assert teacher_confidence(T, mask=mask) == pytest.approx(p.max(-1).values[mask].mean().item(), rel=1e-6)
    beta = teacher_confidence(T, labels)
    assert distill_loss(S, T, 'cakld', 2.0, labels=labels).item() == pytest.approx(
        distill_loss(S, T, 'cakld', 2.0, labels=labels, beta=beta).item(), rel=1e-6)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): distill_loss(S, T, 'cakld', 2.0, beta=1.5)


@pytest.mark.parametrize('kind', DIVERGENCES)
def test_gradcheck_float64(kind):
    g = torch.Generator().manual_seed(1)
    S = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    T = torch.randn(2, 3, 5, dtype=torch.float64, generator=g)
    m = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.autograd.gradcheck(lambda s: distill_loss(s, T, kind, 1.7, mask=m, chunk_size=2, beta=0.35), (S,))
    assert torch.autograd.gradcheck(lambda s: distill_loss(s, T, kind, 1.7, chunk_size=1, beta=0.35, reduction='none'), (S,))
    tk = TopKLogits.from_logits(T, 3)
    assert torch.autograd.gradcheck(lambda s: distill_loss(s, tk, kind, 1.7, mask=m, chunk_size=4, beta=0.35), (S,))


def test_second_derivative_refused_and_inplace_backward_once(logits):
    S, T = logits
    s = S.clone().requires_grad_()
    l = distill_loss(s, T, 'forward_kl', 2.0)
    g, = torch.autograd.grad(l, s, create_graph=True)
    with pytest.raises(RuntimeError): g.sum().backward()
    s2 = S.clone().requires_grad_()
    l2 = distill_loss(s2, T, 'forward_kl', 2.0, inplace_backward=True)
    l2.backward(retain_graph=True)
    s3 = S.clone().requires_grad_()
    distill_loss(s3, T, 'forward_kl', 2.0).backward()
    torch.testing.assert_close(s2.grad, s3.grad, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match='only once'): l2.backward()


def test_inplace_backward_same_gradient(logits, mask):
    S, T = logits
    grads = []
    for inplace in (False, True):
        s = S.clone().requires_grad_()
        (2 * distill_loss(s, T, 'js', 2.0, mask=mask, inplace_backward=inplace)).backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_bf16_student_computed_in_float32(logits):
    S, T = logits
    a = distill_loss(S.bfloat16(), T.bfloat16(), 'forward_kl', 2.0)
    assert a.dtype == torch.float32
    want = 4 * ref_div(S.bfloat16().double(), T.bfloat16().double(), 'forward_kl', 2.0).mean()
    assert a.item() == pytest.approx(want.item(), rel=1e-5)


def test_input_errors(logits):
    S, T = logits
    with pytest.raises(ValueError, match='vocabulary'): distill_loss(S, T[..., :5])
    with pytest.raises(ValueError, match='positions'): distill_loss(S, T[:2])
    with pytest.raises(ValueError, match='expected one of'): distill_loss(S, T, 'kl')
    with pytest.raises(ValueError, match='positive'): distill_loss(S, T, tau=0)
    with pytest.raises(ValueError, match='mask shape'): distill_loss(S, T, mask=torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match='chunk_size'): distill_loss(S, T, chunk_size=0)
    with pytest.raises(ValueError, match='0..18'): distill_loss(S, TopKLogits(T[..., :2], torch.full((3, 7, 2), 40)))
    assert auto_chunk(49152) == 85 and auto_chunk(1) == 1 << 22


# --- top-k teacher -----------------------------------------------------------------------------------------------------
def test_topk_full_k_equals_dense(logits, mask):
    S, T = logits
    for kind in DIVERGENCES:
        a = distill_loss(S, TopKLogits.from_logits(T, 19), kind, 2.0, mask=mask, beta=0.3)
        b = distill_loss(S, T, kind, 2.0, mask=mask, beta=0.3)
        assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_topk_formulas(logits):
    S, T = (x.double() for x in logits)
    k, tau = 5, 2.0
    tk = TopKLogits.from_logits(T, k)
    pt = torch.softmax(tk.values / tau, -1)                                   # renormalized truncated teacher
    ls_full = torch.log_softmax(S / tau, -1)
    fwd = (pt * (pt.log() - ls_full.gather(-1, tk.indices))).sum(-1)
    ps_k = torch.softmax(S.gather(-1, tk.indices) / tau, -1)                  # student restricted to the same k tokens
    rev = ref_kl(ps_k, pt)
    pt_dense = torch.zeros_like(S).scatter(-1, tk.indices, pt)
    ps = ls_full.exp(); m = (ps + pt_dense) / 2
    js = 0.5 * (ps * (ps.log() - m.log())).sum(-1) + 0.5 * torch.where(pt_dense > 0, pt_dense * (pt_dense.log() - m.log()), 0).sum(-1)
    for kind, want in (('forward_kl', fwd), ('reverse_kl', rev), ('js', js), ('cakld', 0.3 * rev + 0.7 * fwd)):
        got = distill_loss(S, tk, kind, tau, beta=0.3, reduction='none')
        torch.testing.assert_close(got, tau ** 2 * want, rtol=1e-10, atol=1e-10)
    # top-k β: the label's renormalized probability when cached, 0 otherwise
    labels = torch.where(torch.arange(7) % 2 == 0, tk.indices[..., 1], torch.full((3, 7), -1, dtype=torch.long))
    labels = torch.where(labels < 0, (tk.indices[..., :1].squeeze(-1) + 1) % 19, labels)
    hit = (tk.indices == labels[..., None])
    want_beta = (torch.softmax(tk.values, -1) * hit).sum(-1).mean().item()
    assert teacher_confidence(tk, labels) == pytest.approx(want_beta, rel=1e-9)


# --- task loss ---------------------------------------------------------------------------------------------------------
def test_shift_targets_and_causal_lm_loss():
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 6, 11, generator=g), torch.randint(0, 11, (2, 6), generator=g)
    am = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])        # left padding
    lab = ids.masked_fill(am == 0, -100)
    tgt, valid = shift_targets(lab, am)
    assert valid.tolist() == [[True] * 5 + [False], [False, False, True, True, True, False]]
    assert (tgt[valid] == ids[:, 1:][valid[:, :-1]]).all() and (tgt[~valid] == -100).all()
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 11), lab[:, 1:].reshape(-1), ignore_index=-100)
    assert causal_lm_loss(logits, lab).item() == pytest.approx(want.item(), rel=1e-6)
    # with the attention mask, the pad at position 1 no longer predicts the first real token
    want2 = F.cross_entropy(logits[valid], tgt[valid])
    assert causal_lm_loss(logits, lab, am, chunk_size=1).item() == pytest.approx(want2.item(), rel=1e-6)
    assert valid.sum() == (lab[:, 1:] != -100).sum() - 1
    # a pad position never predicts the first real token, even if labels do not mark the pads
    _, v2 = shift_targets(ids, am)
    assert not v2[1, 1] and v2[1, 2]


def test_row_losses_weights():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(9, 5, generator=g, requires_grad=True); y = torch.randint(0, 5, (9,), generator=g)
    fn = lambda x, t: torch.stack([F.cross_entropy(x, t, reduction='none'), x.pow(2).sum(-1)], -1)
    comb, parts = row_losses(fn, s, (y,), chunk_size=2, weights=[1.0, 0.25])
    want = F.cross_entropy(s, y, reduction='none') + 0.25 * s.pow(2).sum(-1)
    torch.testing.assert_close(comb, want.detach(), rtol=1e-6, atol=1e-7)
    assert not parts.requires_grad
    ga, = torch.autograd.grad(comb.sum(), s); gb, = torch.autograd.grad(want.sum(), s)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match='rows'): row_losses(fn, s, (y[:3],))


# --- feature losses ----------------------------------------------------------------------------------------------------
def test_feature_losses_against_formulas():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(3, 4, 6, dtype=torch.float64, generator=g), torch.randn(3, 4, 6, dtype=torch.float64, generator=g)
    m = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    a, b = fs[m], ft[m]
    assert feature_loss(fs, ft, 'nmse', mask=m).item() == pytest.approx((((a - b) ** 2).sum() / (b ** 2).sum()).item(), rel=1e-12)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    assert feature_loss(fs, ft, 'cosine', mask=m).item() == pytest.approx((1 - cos).mean().item(), rel=1e-12)
    p, q = torch.softmax(b / 3, -1), torch.softmax(a / 3, -1)
    assert feature_loss(fs, ft, 'softmax_kl', tau=3.0, mask=m).item() == pytest.approx(9 * (p * (p / q).log()).sum(-1).mean().item(), rel=1e-12)
    assert feature_loss(ft, ft, 'softmax_kl').item() == pytest.approx(0, abs=1e-12)
    assert feature_loss(torch.zeros_like(ft), ft).item() == pytest.approx(1.0)
    assert feature_loss(-ft, ft, 'cosine').item() == pytest.approx(2.0)
    s = fs.clone().requires_grad_(); t = ft.clone().requires_grad_()
    feature_loss(s, t, 'nmse').backward()
    assert s.grad is not None and t.grad is None                # the teacher side is a constant
    with pytest.raises(ValueError, match='FeatureProjector'): feature_loss(fs[..., :3], ft)
    with pytest.raises(ValueError, match='expected one of'): feature_loss(fs, ft, 'l1')


# --- L_quant -----------------------------------------------------------------------------------------------------------
FORMATS = ['int8', 'int4', 'int4-g32', 'int4-g128-asym', 'int3-g64', 'int2-g64-asym', 'int4-tensor', 'nf4-g64', 'mxfp4', 'nvfp4',
           'fp8-e4m3', 'fp8-e5m2', 'fp8-e4m3-ch']


@pytest.mark.parametrize('fmt', FORMATS)
def test_quant_penalty_formula_zero_on_grid_and_gradient(fmt):
    torch.manual_seed(0)
    net = quantize_model(nn.Sequential(nn.Linear(160, 48), nn.ReLU(), nn.Linear(48, 24)), fmt, ignore=())
    with torch.no_grad():
        for p in net.parameters(): p.normal_(0, 0.05)
    layers = list(fake_quant_layers(net).values())
    per = []
    for m in layers:
        w = m.weight.detach()
        per.append((((w - dequantize(quantize(w, fmt))) / brute_step(w, fmt)) ** 2).mean())
    pen = quant_penalty(net)
    assert pen.item() == pytest.approx(torch.stack(per).mean().item(), rel=1e-5)
    assert 0.06 < pen.item() < 0.11              # rounding noise measured in grid steps: about 1/12 in every format
    # gradient: 2(W − Q)/(Δ²·n·L), pointing from the grid point to the weight
    pen.backward()
    for m in layers:
        w = m.weight.detach()
        want = 2 * (w - dequantize(quantize(w, fmt))) / brute_step(w, fmt) ** 2 / w.numel() / len(layers)
        torch.testing.assert_close(m.weight.grad, want, rtol=1e-4, atol=1e-9)
    # on the grid: exactly zero for formats whose rounding is idempotent
    if fmt in ('int8', 'int4', 'int4-g32', 'int3-g64', 'int4-tensor', 'nf4-g64', 'mxfp4', 'fp8-e4m3', 'fp8-e5m2', 'fp8-e4m3-ch'):
        with torch.no_grad():
            for m in layers: m.weight.copy_(fake_quant(m.weight, m.w_spec))
        assert quant_penalty(net).item() == 0.0


def test_gradient_descent_on_penalty_moves_weights_to_grid():
    torch.manual_seed(1)
    net = quantize_model(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)), 'int4-g32', ignore=())
    dist0 = sum((m.weight - fake_quant(m.weight, m.w_spec)).abs().sum().item() for m in fake_quant_layers(net).values())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    hist = []
    for _ in range(30):
        loss = quant_penalty(net); hist.append(loss.item())
        opt.zero_grad(); loss.backward(); opt.step()
    assert all(b < a for a, b in zip(hist, hist[1:]))
    assert hist[-1] < 1e-3 * hist[0]
    dist1 = sum((m.weight - fake_quant(m.weight, m.w_spec)).abs().sum().item() for m in fake_quant_layers(net).values())
    assert dist1 < 0.05 * dist0


def test_penalty_independent_of_quant_switch_and_modes():
    torch.manual_seed(0)
    net = quantize_model(nn.Sequential(nn.Linear(64, 32)), 'int4-g16', ignore=())
    a = quant_penalty(net).item()
    set_quant_enabled(net, False)
    assert quant_penalty(net).item() == a
    for mode in ('frozen', 'learned', 'clip'):
        torch.manual_seed(0)
        n2 = quantize_model(nn.Sequential(nn.Linear(64, 32)), 'int4-g16', ignore=(), mode=mode)
        assert quant_penalty(n2).item() == pytest.approx(a, rel=1e-5)     # all start equal to the absmax quantizer
        set_quant_enabled(n2, False); assert quant_penalty(n2).item() == pytest.approx(a, rel=1e-5)
        assert n2[0].weight_quantizer.enabled is False                     # the switch is restored
    assert quant_penalty(nn.Sequential(nn.Linear(3, 3))).item() == 0.0
    w = net[0].weight.detach()
    assert layer_quant_error(net[0], 'none').item() == pytest.approx(((w - fake_quant(w, 'int4-g16')) ** 2).mean().item(), rel=1e-6)
    assert layer_quant_error(net[0], 'weight').item() == pytest.approx(
        (((w - fake_quant(w, 'int4-g16')) ** 2).mean() / (w ** 2).mean()).item(), rel=1e-6)
    assert quant_penalty(net, layers='nothing*').item() == 0.0
    with pytest.raises(ValueError, match='normalize'): layer_quant_error(net[0], 'max')


# --- soft-target entropy -----------------------------------------------------------------------------------------------
def test_entropy_hand_computed():
    V = 500
    assert torch.allclose(soft_target_entropy(torch.zeros(2, 3, V), 3.0), torch.full((2, 3), math.log(V)))
    spike = torch.zeros(1, V); spike[0, 7] = 200.0
    assert soft_target_entropy(spike, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    two = torch.full((1, V), -80.0); two[0, :2] = 0
    assert soft_target_entropy(two, 1.0).item() == pytest.approx(math.log(2), rel=1e-6)
    # logits (0, log 2, log 3)/τ at τ: p ∝ (1, 2^(1/τ), 3^(1/τ))
    z = torch.tensor([[0.0, math.log(2), math.log(3)]])
    for tau in (1.0, 2.0):
        p = torch.tensor([1, 2 ** (1 / tau), 3 ** (1 / tau)], dtype=torch.float64); p /= p.sum()
        assert soft_target_entropy(z, tau).item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)
    m = torch.tensor([[True, False, True]])
    assert soft_target_entropy(torch.zeros(1, 3, V), 1.0, mask=m).shape == (2,)
    tk = TopKLogits.from_logits(torch.zeros(1, V), 8)
    assert soft_target_entropy(tk, 1.0).item() == pytest.approx(math.log(8), rel=1e-6)


def test_check_soft_targets_band_and_actions():
    V = 1000
    uni = check_soft_targets(torch.zeros(5, V), 1.0, action='none')
    assert (uni['ok'], uni['frac_uniform'], uni['frac_one_hot'], uni['normalized_entropy']) == (False, 1.0, 0.0, pytest.approx(1.0))
    assert uni['top10_mass'] == pytest.approx(10 / V, rel=1e-5) and uni['vocab'] == V and 'lower tau' in uni['message']
    peaked = torch.zeros(5, V); peaked[:, 0] = 50
    one = check_soft_targets(peaked, 1.0, action='none')
    assert (one['ok'], one['frac_one_hot']) == (False, 1.0) and 'raise tau' in one['message']
    with pytest.raises(ValueError, match='near one-hot'): check_soft_targets(peaked, 1.0, action='stop')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); check_soft_targets(torch.zeros(5, V), 1.0)
    assert len(w) == 1 and 'near uniform' in str(w[0].message)
    # half the positions peaked, half uniform: both fractions 0.5 <= max_frac -> ok
    mix = torch.cat([peaked[:2], torch.zeros(2, V)])
    r = check_soft_targets(mix, 1.0, action='stop')
    assert r['ok'] and r['frac_one_hot'] == 0.5 == r['frac_uniform']
    # the band is in H / log V: a distribution with H = 0.5 log V is ok with the defaults
    half = torch.full((1, 10_000), -1e4); half[0, :100] = 0          # uniform over 100 of 10,000 tokens: H/log V = 0.5
    assert check_soft_targets(half, 1.0)['normalized_entropy'] == pytest.approx(0.5, rel=1e-6)
    df = entropy_sweep(peaked, taus=(1, 100))
    assert list(df.tau) == [1.0, 100.0] and df.normalized_entropy.is_monotonic_increasing
    with pytest.raises(ValueError): check_soft_targets(peaked, 1.0, low=0.9, high=0.1)


# --- schedule ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('total, warm_end, final_start', [(1000, 50, 900), (100, 5, 90), (20, 1, 18), (7, 0, 6), (1, 0, 1)])
def test_schedule_exact_boundaries(total, warm_end, final_start):
    s = LossSchedule(total)
    assert (s.warmup_end, s.final_start) == (warm_end, final_start)
    for step in range(total + 3):
        want = 'warmup' if step < warm_end else 'final' if step >= final_start else 'joint'
        assert s.phase(step) == want
        assert s.weights(step) == {'warmup': (0.9, 0.1), 'joint': (0.5, 0.3), 'final': (0.2, 0.1)}[want]
    with pytest.raises(ValueError): s.phase(-1)


def test_adaptive_rule():
    s = LossSchedule(200, ratio_threshold=3.0, lam_step=0.05, lam_min=0.3)
    assert not s.end_epoch(10.0, step=5)              # warm-up (steps 0..9): no change
    assert not s.end_epoch(3.0, step=50)              # not above the threshold
    assert s.end_epoch(3.01, step=50) and s.weights(50) == (pytest.approx(0.45), 0.3) and s.weights(195)[0] == pytest.approx(0.3)
    assert s.weights(0) == (0.9, 0.1)                 # warm-up λ is never changed
    for _ in range(5): s.end_epoch(4.0, step=60)
    assert s.weights(60)[0] == pytest.approx(0.3) and s.weights(190)[0] == pytest.approx(0.3)   # floor lam_min
    # observed ratios: warm-up observations and non-finite values are ignored
    s2 = LossSchedule(200)
    s2.observe(3, 100.0); s2.observe(20, 2.0); s2.observe(21, float('nan')); s2.observe(22, 2.5)
    assert not s2.end_epoch(step=30)                  # mean 2.25
    s2.observe(40, 3.5); s2.observe(41, 3.0)
    assert s2.end_epoch(step=45) and s2.lam_offset == pytest.approx(0.05)
    assert not s2.end_epoch(step=46)                  # nothing observed since
    assert not LossSchedule(200, adaptive=False).end_epoch(9.0, step=100)


def test_schedule_state_dict_round_trip():
    s = LossSchedule(300, warmup_frac=0.1, final_frac=0.2, joint=(0.6, 0.25))
    s.end_epoch(5.0, step=100); s.observe(120, 7.0)
    st = s.state_dict()
    import json; st = json.loads(json.dumps(st))      # plain Python values
    s2 = LossSchedule(300, warmup_frac=0.1, final_frac=0.2, joint=(0.6, 0.25)); s2.load_state_dict(st)
    s3 = LossSchedule.from_state_dict(st)
    for x in (s2, s3):
        assert [x.weights(i) for i in range(300)] == [s.weights(i) for i in range(300)]
        assert x.history == s.history and x.state_dict() == s.state_dict()
    assert s2.end_epoch(step=150) == s.end_epoch(step=150) is True     # the pending observation survived
    with pytest.raises(ValueError, match='joint'): LossSchedule(300, warmup_frac=0.1, final_frac=0.2).load_state_dict(st)
    LossSchedule(300).load_state_dict(st, strict=False)
    for bad in (dict(total_steps=0), dict(total_steps=10, warmup_frac=0.6, final_frac=0.6), dict(total_steps=10, joint=(0.5,))):
        with pytest.raises(ValueError): LossSchedule(**bad)


# --- joint loss --------------------------------------------------------------------------------------------------------
def tiny(hidden=32, layers=2, vocab=61, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


@pytest.fixture(scope='module')
def pair_models():
    return tiny(layers=3).eval().requires_grad_(False), quantize_model(tiny(hidden=16, seed=1), 'int4-g8')


@pytest.mark.parametrize('kind', DIVERGENCES)
def test_joint_loss_components(pair_models, kind):
    teacher, student = pair_models
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 61, (2, 12), generator=g); am = torch.ones_like(ids); am[0, 9:] = 0
    labels = ids.masked_fill(am == 0, -100)
    pairs = layer_pairs(student, teacher, modules=('mlp.down_proj', 'self_attn.o_proj'))
    joint = JointLoss(LossSchedule(40), kind, tau=3.0, feature_pairs=pairs, feature_kind='cosine', feature_weight=0.7,
                      projectors=build_projectors(student, teacher, pairs))
    with FeatureCapture(student, [s for s, _ in pairs]) as sc, FeatureCapture(teacher, [t for _, t in pairs], detach=True) as tc:
        s_logits = student(ids, attention_mask=am).logits
        with torch.no_grad(): t_logits = teacher(ids, attention_mask=am).logits
    sl = s_logits.detach().requires_grad_()
    out = joint(10, sl, labels, t_logits, student, sc.features, tc.features, mask=am)
    lam, gam = 0.5, 0.3
    assert (out['phase'], out['lam'], out['gam']) == ('joint', lam, gam)
    tgt, valid = shift_targets(labels, am)
    task = causal_lm_loss(sl.detach(), labels, am)
    beta = teacher_confidence(t_logits, tgt, valid) if kind == 'cakld' else None
    distill = distill_loss(sl.detach(), t_logits, kind, 3.0, mask=valid, beta=beta)
    feats = torch.stack([feature_loss(joint.projectors[k](sc.features[s]), tc.features[t], 'cosine', mask=am.bool())
                         for (s, t), k in zip(pairs, [pair_key(*p) for p in pairs])]).mean()
    quant = quant_penalty(student)
    for k, v in (('task', task), ('distill', distill), ('feature', feats), ('quant', quant)):
        assert out[k].item() == pytest.approx(v.item(), rel=1e-5), k
        assert not out[k].requires_grad
    assert out['total'].item() == pytest.approx((task + lam * (distill + 0.7 * feats) + gam * quant).item(), rel=1e-5)
    assert out['ratio'] == pytest.approx(((distill + 0.7 * feats) / task).item(), rel=1e-5)
    # the fused gradient wrt the logits equals the gradient of the separate terms
    g_fused, = torch.autograd.grad(out['total'], sl, retain_graph=False)
    sl2 = s_logits.detach().requires_grad_()
    g_sep, = torch.autograd.grad(causal_lm_loss(sl2, labels, am) + lam * distill_loss(sl2, t_logits, kind, 3.0, mask=valid, beta=beta), sl2)
    torch.testing.assert_close(g_fused, g_sep, rtol=1e-5, atol=1e-8)


def test_joint_loss_backward_reaches_student_and_projectors_only(pair_models):
    teacher, _ = pair_models
    student = quantize_model(tiny(hidden=16, seed=1), 'int4-g8')
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(1))
    pairs = layer_pairs(student, teacher, modules=('mlp.down_proj',))
    joint = JointLoss(LossSchedule(40), 'forward_kl', 2.0, feature_pairs=pairs, feature_weight=1.0,
                      projectors=build_projectors(student, teacher, pairs))
    with FeatureCapture(student, [s for s, _ in pairs]) as sc, FeatureCapture(teacher, [t for _, t in pairs], detach=True) as tc:
        s_logits = student(ids).logits
        with torch.no_grad(): t_logits = teacher(ids).logits
    out = joint(20, s_logits, ids, t_logits, student, sc.features, tc.features)
    out['total'].backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in joint.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # γ·L_quant reaches the master weights: the gradient differs from a run without the student's penalty
    w = student.model.layers[0].mlp.down_proj.weight
    g_with = w.grad.clone()
    student.zero_grad(); joint.zero_grad()
    with FeatureCapture(student, [s for s, _ in pairs]) as sc:
        s_logits = student(ids).logits
    joint(20, s_logits, ids, t_logits, None, sc.features, tc.features)['total'].backward()
    torch.testing.assert_close(g_with - w.grad, 0.3 * torch.autograd.grad(quant_penalty(student), w)[0], rtol=1e-4, atol=1e-9)


def test_joint_loss_no_teacher_topk_and_observe(pair_models):
    teacher, student = pair_models
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(): s_logits, t_logits = student(ids).logits, teacher(ids).logits
    sch = LossSchedule(100)
    joint = JointLoss(sch, 'reverse_kl', 2.0)
    o = joint(1, s_logits, ids, None, student)
    assert o['distill'].item() == 0 and o['ratio'] == 0 and o['phase'] == 'warmup'
    assert o['total'].item() == pytest.approx((o['task'] + 0.1 * o['quant']).item(), rel=1e-6)
    assert sch._ratio_n == 0
    tk = TopKLogits.from_logits(t_logits, 61)
    o1, o2 = joint(50, s_logits, ids, tk), joint(50, s_logits, ids, t_logits)
    assert o1['distill'].item() == pytest.approx(o2['distill'].item(), rel=1e-5, abs=1e-6)   # float32 KL of ~0.01 from log-probs of ~4
    assert sch._ratio_n == 0                          # calls never observe: the step's end does, once
    rec = joint.end_step(50, o1['task'].item(), o1['distill'].item(), 0.0, o1['quant'].item())
    assert sch._ratio_n == 1 and rec['ratio'] == pytest.approx(o1['ratio'], rel=1e-6)
    joint.end_step(51, o1['task'].item(), 0.0, 0.0, 0.0, distilling=False); assert sch._ratio_n == 1   # no teacher: nothing observed
    with pytest.raises(ValueError, match='not captured'):
        JointLoss(sch, feature_pairs=[('a', 'b')], feature_weight=1.0)(50, s_logits, ids, t_logits, s_feats={}, t_feats={})
    with pytest.raises(ValueError, match='expected one of'): JointLoss(sch, 'kl')


def _buckets(logits, idx, tau):
    "Full tempered softmax collapsed onto the top-k tokens plus one 'rest' bucket (float64)."
    p = torch.softmax(logits.double() / tau, -1)
    pk = p.gather(-1, idx)
    return torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)


@pytest.mark.parametrize("k", [1, 5, 63])
def test_topk_with_tail_is_exact_over_buckets(k):
    torch.manual_seed(k)
    S, T = torch.randn(3, 7, 64) * 2, torch.randn(3, 7, 64) * 2
    tk = TopKLogits.from_logits(T, k, tau=3.0)
    pt, ps = _buckets(T, tk.indices, 3.0), _buckets(S, tk.indices, 3.0)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)
    m = (pt + ps) / 2
    ref = {'forward_kl': kl(pt, ps), 'reverse_kl': kl(ps, pt), 'js': 0.5 * kl(ps, m) + 0.5 * kl(pt, m),
           'cakld': 0.25 * kl(ps, pt) + 0.75 * kl(pt, ps)}
    for kind in DIVERGENCES:
        got = distill_loss(S, tk, kind, 3.0, beta=0.25)
        assert torch.allclose(got.double(), 9 * ref[kind].mean(), rtol=1e-4, atol=1e-6), kind


def test_topk_tail_shift_invariant_and_tau_checked():
    torch.manual_seed(0)
    S, T = torch.randn(2, 5, 40), torch.randn(2, 5, 40) * 3
    a = TopKLogits.from_logits(T, 6, tau=2.0)
    b = TopKLogits.from_logits(T + 7.5, 6, tau=2.0)                # a constant shift of the logits changes nothing
    assert torch.allclose(distill_loss(S, a, tau=2.0), distill_loss(S, b, tau=2.0), atol=1e-5)
    with pytest.raises(ValueError, match='tau=2.0'): distill_loss(S, a, tau=1.0)
    no_tail = TopKLogits.from_logits(T, 6)                        # the renormalized top-k differs from the bucketed one
    assert not torch.allclose(distill_loss(S, no_tail, tau=2.0), distill_loss(S, a, tau=2.0))
