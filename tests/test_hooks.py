"Tests of kdq_bench.hooks on tiny random Llama models (CPU, seconds)."
import math
import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from kdq_bench.hooks import (resolve_names, FeatureCapture, FeatureProjector, build_projectors, layer_pairs, pair_key,
                             ActivationStats, _merge_moments)
from kdq_bench.quantizers import quantize_model

torch.set_num_threads(1)


def tiny(hidden=32, layers=2, inter=64, vocab=97, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope='module')
def model(): return tiny()


@pytest.fixture(scope='module')
def ids(): return torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))


# --- names ---------------------------------------------------------------------------------------------------------
def test_resolve_exact_and_glob(model):
    assert resolve_names(model, 'model.layers.0.mlp.down_proj') == ['model.layers.0.mlp.down_proj']
    assert resolve_names(model, ['model.layers.*.self_attn.o_proj', 'model.layers.1.self_attn.o_proj']) == \
        ['model.layers.0.self_attn.o_proj', 'model.layers.1.self_attn.o_proj']


@pytest.mark.parametrize('bad, expected', [('model.layers.1.self_attn.o_prj', 'model.layers.1.self_attn.o_proj'),
                                           ('model.layer.0.mlp.down_proj', 'model.layers.0.mlp.down_proj'),
                                           ('model.layers.7.mlp.down_proj', 'model.layers.1.mlp.down_proj')])
def test_unknown_name_lists_close_matches(model, bad, expected):
    with pytest.raises(ValueError) as e: FeatureCapture(model, [bad])
    msg = str(e.value)
    assert repr(bad) in msg and 'close matches' in msg and expected in msg
    assert n_hooks(model) == 0


def test_unrelated_name_lists_examples(model):
    with pytest.raises(ValueError, match='module names look like'): resolve_names(model, 'zzzzzzzz')
    with pytest.raises(ValueError, match='no module named'): resolve_names(model, 'model.layers.*.nothing')
    with pytest.raises(ValueError, match='non-empty'): resolve_names(model, [''])


# --- feature capture -----------------------------------------------------------------------------------------------
def test_capture_equals_module_output(model, ids):
    names = ['model.layers.0.self_attn.o_proj', 'model.layers.1.mlp.down_proj', 'model.layers.0']
    inputs = {}
    pre = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, kw, n=n: inputs.__setitem__(n, (a, kw)), with_kwargs=True)
           for n in names[:2]]
    with torch.no_grad(), FeatureCapture(model, names) as cap:
        out = model(ids, output_hidden_states=True)
    for h in pre: h.remove()
    for n in names[:2]:
        a, kw = inputs[n]
        with torch.no_grad(): assert torch.equal(cap[n], model.get_submodule(n)(*a, **kw))
    # a decoder layer's output (the first element if it returns a tuple) is the next hidden state
    assert torch.equal(cap['model.layers.0'], out.hidden_states[1])
    assert cap.features.keys() == set(names)


def test_capture_keeps_graph_unless_detached(ids):
    m = tiny()
    with FeatureCapture(m, ['model.layers.0.mlp.down_proj']) as c1, FeatureCapture(m, ['model.layers.0.mlp.down_proj'], detach=True) as c2:
        m(ids)
    f = c1['model.layers.0.mlp.down_proj']
    assert f.requires_grad and not c2['model.layers.0.mlp.down_proj'].requires_grad
    f.sum().backward()
    assert m.model.layers[0].mlp.down_proj.weight.grad is not None


def test_removal_leaves_no_hooks(model, ids):
    before = n_hooks(model)
    with FeatureCapture(model, 'model.layers.*.mlp.down_proj') as cap:
        assert n_hooks(model) == before + 2 and cap.active
    assert n_hooks(model) == before and not cap.active
    cap2 = FeatureCapture(model, ['model.layers.0.self_attn.o_proj'])
    cap2.remove(); cap2.remove()            # idempotent
    assert n_hooks(model) == before
    with ActivationStats(model) as st:
        assert n_hooks(model) == before + len(st.names)
    assert n_hooks(model) == before
    with torch.no_grad(): model(ids)
    assert st.summary().empty               # nothing recorded after removal


def test_clear_and_missing_feature(model, ids):
    cap = FeatureCapture(model, ['model.layers.0.mlp.down_proj'])
    with pytest.raises(ValueError, match='run a forward pass'): cap['model.layers.0.mlp.down_proj']
    with torch.no_grad(): model(ids)
    assert 'model.layers.0.mlp.down_proj' in cap.features
    cap.clear(); assert cap.features == {}
    cap.remove()


# --- projections and pairs -----------------------------------------------------------------------------------------
def test_projector_identity_and_linear():
    p = FeatureProjector(8, 8)
    x = torch.randn(2, 3, 8)
    assert isinstance(p.proj, nn.Identity) and torch.equal(p(x), x) and not list(p.parameters())
    q = FeatureProjector(8, 12)
    assert q(x).shape == (2, 3, 12) and sum(t.numel() for t in q.parameters()) == 96
    with pytest.raises(ValueError, match='width 8'): q(torch.randn(2, 5))
    with pytest.raises(ValueError): FeatureProjector(0, 3)


def test_layer_pairs_depth_mapping():
    t4, s2 = tiny(layers=4), tiny(hidden=16, layers=2, seed=1)
    assert layer_pairs(s2, t4, modules=('mlp.down_proj',)) == [('model.layers.0.mlp.down_proj', 'model.layers.0.mlp.down_proj'),
                                                               ('model.layers.1.mlp.down_proj', 'model.layers.3.mlp.down_proj')]
    t5, s3 = tiny(layers=5), tiny(layers=3)
    assert [t for _, t in layer_pairs(s3, t5, modules=('self_attn.o_proj',))] == [f'model.layers.{i}.self_attn.o_proj' for i in (0, 2, 4)]
    assert layer_pairs(s3, t5, modules=('mlp.down_proj',), layers=[1]) == [('model.layers.1.mlp.down_proj', 'model.layers.2.mlp.down_proj')]
    with pytest.raises(ValueError, match='out of range'): layer_pairs(s3, t5, layers=[3])
    with pytest.raises(ValueError, match='no module named'): layer_pairs(s3, t5, modules=('mlp.nope',))


def test_build_projectors_widths(ids):
    t, s = tiny(layers=2), tiny(hidden=16, layers=2, seed=1)
    pairs = layer_pairs(s, t)
    projs = build_projectors(s, t, pairs)
    for sn, tn in pairs:
        p = projs[pair_key(sn, tn)]
        assert (p.s_dim, p.t_dim) == (16, 32)
    # a non-linear module needs a sample forward pass
    with pytest.raises(ValueError, match='sample'): build_projectors(s, t, [('model.layers.0', 'model.layers.1')])
    pr = build_projectors(s, t, [('model.layers.0', 'model.layers.1')], sample=ids)
    assert (pr[pair_key('model.layers.0', 'model.layers.1')].s_dim, pr[pair_key('model.layers.0', 'model.layers.1')].t_dim) == (16, 32)
    assert '.' not in pair_key('a.b', 'c.d')


# --- activation statistics -----------------------------------------------------------------------------------------
def direct_stats(x, lo=-4.0, hi=5.0, bins=90):
    x = x.double()
    mu = x.mean(0); c = x - mu
    lg = torch.log10(x.abs().clamp_min(10 ** lo)).clamp(max=hi)
    idx = ((lg - lo) / (hi - lo) * bins).floor().clamp(0, bins - 1).long()
    return dict(absmax=x.abs().amax(0), mean=mu, std=c.pow(2).mean(0).sqrt(),
                kurtosis=c.pow(4).mean(0) / c.pow(2).mean(0) ** 2, hist=torch.bincount(idx.flatten(), minlength=bins).double())


def collect_inputs(model, names, batches):
    xs = {n: [] for n in names}
    hs = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
          for n in names]
    return xs, hs


def test_activation_stats_against_direct_computation(model):
    names = ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj', 'model.layers.1.mlp.down_proj', 'lm_head']
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 97, (2, 9), generator=g), torch.randint(0, 97, (3, 5), generator=g), torch.randint(0, 97, (1, 16), generator=g)]
    xs, hs = collect_inputs(model, names, batches)
    with ActivationStats(model) as st, torch.no_grad():
        for b in batches: model(b)
    for h in hs: h.remove()
    for n in names:
        d, ref = st.layer(n), direct_stats(torch.cat(xs[n]))
        assert d['tokens'] == 18 + 15 + 16
        for k in ('absmax', 'mean', 'std'): torch.testing.assert_close(d[k], ref[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d['kurtosis'], ref['kurtosis'], rtol=1e-4, atol=1e-5)
        assert d['hist'].sum() == ref['hist'].sum() == torch.cat(xs[n]).numel()
        assert (d['hist'] - ref['hist']).abs().sum() <= 2          # float32 vs float64 binning at bin edges
        assert torch.equal(d['bin_edges'], torch.linspace(-4, 5, 91, dtype=torch.float64))
    # q_proj and v_proj see the same tensor: identical statistics (computed once)
    assert torch.equal(st.layer(names[0])['kurtosis'], st.layer(names[1])['kurtosis'])


def test_merge_equals_single_batch(model):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 97, (2, 8), generator=g), torch.randint(0, 97, (3, 8), generator=g)
    with ActivationStats(model, names='model.layers.*.mlp.down_proj') as s1, torch.no_grad():
        model(a); model(b)
    with ActivationStats(model, names='model.layers.*.mlp.down_proj') as s2, torch.no_grad():
        model(torch.cat([a, b]))
    for n in s1.names:
        d1, d2 = s1.layer(n), s2.layer(n)
        for k in ('absmax', 'mean', 'std', 'kurtosis', 'hist'): torch.testing.assert_close(d1[k], d2[k], rtol=1e-4, atol=1e-5)


def test_merge_moments_formula_exact_in_float64():
    x = torch.randn(50, 3, dtype=torch.float64) * 2 + 5
    def mom(v):
        c = v - v.mean(0)
        return (v.shape[0], v.mean(0), c.pow(2).sum(0), c.pow(3).sum(0), c.pow(4).sum(0))
    merged = _merge_moments(mom(x[:13]), mom(x[13:]))
    for m, r in zip(merged[1:], mom(x)[1:]): torch.testing.assert_close(m, r, rtol=1e-12, atol=1e-10)
    assert merged[0] == 50


def test_kurtosis_flags_outlier_channel():
    lin = nn.Sequential(nn.Linear(4, 2))
    x = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0)); x[:, 3] = 0; x[::500, 3] = 50.0
    x[:, 2] = 1.5                                   # constant channel: kurtosis undefined
    with ActivationStats(lin) as st, torch.no_grad(): lin(x)
    k = st.layer('0')['kurtosis']
    assert abs(k[0] - 3) < 0.3 and abs(k[1] - 3) < 0.3 and math.isnan(k[2]) and k[3] > 100
    row = st.summary().iloc[0]
    assert row['top_channel'] == 3 and row['absmax'] == 50.0 and row['channels'] == 4 and row['tokens'] == 4000


def test_stats_on_fake_quantized_student_and_errors(ids):
    s = quantize_model(tiny(), 'int4-g8')
    with ActivationStats(s) as st, torch.no_grad(): s(ids)
    assert len(st.summary()) == len(st.names) == 2 * 7 + 1
    with pytest.raises(ValueError, match='close matches'): st.layer('model.layers.0.mlp.down_prj')
    with pytest.raises(ValueError): ActivationStats(s, bins=0)
    st2 = ActivationStats(s, names=['lm_head'])
    with pytest.raises(ValueError, match='no data'): st2.layer('lm_head')
    st2.reset(); st2.remove()
