"""Numbers behind the dashboards (kdq_bench.dashboards), checked against independent reference formulas."""
import copy, html, json, math, time, warnings
import numpy as np
import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import kdq_bench.trainer as trainer_mod
from kdq_bench.dashboards import (
    DASHBOARD_FORMATS, MONITOR_KEYS, TAUS, EntropyInspector, OutlierInspector, OutlierReport, TrainingMonitor,
    check_batch, check_tau, entropy_at, entropy_figure, entropy_table, linear_names, monitor_figure, monitor_series,
    normalize_record, outlier_figure, outlier_severity, phase_spans, soft_target_band, teacher_logits, top_soft_targets)
from kdq_bench.losses import check_soft_targets
from kdq_bench.ptq import smoothquant
from kdq_bench.trainer import TrainConfig, Trainer

torch.set_num_threads(1)


def pearson_kurtosis(x, axis=None):
    "E[(x-mean)^4] / E[(x-mean)^2]^2 in float64 numpy (the textbook formula)."
    x = np.asarray(x, dtype=np.float64)
    c = x - x.mean(axis=axis, keepdims=True)
    return (c ** 4).mean(axis=axis) / (c ** 2).mean(axis=axis) ** 2


def tiny_llama(seed=0, vocab=97, hidden=32, layers=2, ctx=64, outlier=40.0, sharpen=1.0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ctx)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.layers[1].post_attention_layernorm.weight[5] = outlier
        m.lm_head.weight.mul_(sharpen)
    return m


@pytest.fixture(scope='module')
def llama():
    return tiny_llama()


@pytest.fixture(scope='module')
def ids():
    return torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- outlier inspector

class Toy(nn.Module):
    "Embedding with known rows feeding linear layers whose inputs are known exactly."
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 4)
        with torch.no_grad():
            self.emb.weight.copy_(torch.tensor([[1., -2., 0.5, 3.], [-1., 1., 0.25, -1.], [0.5, 0.5, -0.5, 2.], [2., -1., 1., 0.]]))
        self.g = torch.tensor([1., 1., 30., 1.])           # plants an outlier on channel 2 of `b`'s input
        self.a, self.d = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)   # both read x: one input group
        self.b = nn.Linear(4, 3, bias=False)
        self.c = nn.Linear(3, 2)

    def forward(self, ids):
        x = self.emb(ids)
        y = self.a(x) + self.d(x)
        return self.c(y) + self.b(x * self.g).sum(-1, keepdim=True)


def test_outlier_ranking_against_hand_computed_maxima():
    torch.manual_seed(0)
    m, ids = Toy().eval(), torch.tensor([[0, 1, 3], [2, 2, 1]])
    rep = OutlierReport(m, ids)
    E = m.emb.weight.detach().double().numpy()
    x = E[ids.numpy().ravel()]                              # [6, 4] the inputs of a, d
    xa = np.abs(x).max(0)
    xb = np.abs(x * m.g.numpy()).max(0)
    with torch.no_grad(): y = (m.a(torch.tensor(x).float()) + m.d(torch.tensor(x).float())).double().numpy()
    xc = np.abs(y).max(0)
    def sev(v): return v.max() / np.sort(v)[(len(v) - 1) // 2]   # max / lower median
    expect = {'a': sev(xa), 'd': sev(xa), 'b': sev(xb), 'c': sev(xc)}
    ranked = sorted(expect, key=lambda k: -expect[k])
    assert rep.names[0] == 'b' and sorted(rep.names) == sorted(expect)
    assert [expect[n] for n in rep.names] == sorted(expect.values(), reverse=True)
    for n, ref in (('a', xa), ('b', xb), ('c', xc)):
        np.testing.assert_allclose(rep.layer(n)['act_absmax'].double().numpy(), ref, rtol=1e-6)
        row = rep.table.set_index('layer').loc[n]
        assert row['act_severity'] == pytest.approx(expect[n], rel=1e-6)
        w = m.get_submodule(n).weight.detach().double().numpy()
        np.testing.assert_allclose(rep.layer(n)['w_absmax'].double().numpy(), np.abs(w).max(0), rtol=1e-6)
        assert row['w_kurtosis'] == pytest.approx(pearson_kurtosis(w.ravel()), rel=1e-5)
        assert rep.layer(n)['w_kurtosis'] == row['w_kurtosis']
        lw = np.log10(np.clip(np.abs(w), 1e-4, None)).clip(max=5.0)
        np.testing.assert_array_equal(rep.layer(n)['w_hist'].numpy(), np.histogram(lw, bins=90, range=(-4.0, 5.0))[0])
    kx = pearson_kurtosis(x, axis=0)
    np.testing.assert_allclose(rep.layer('a')['act_kurtosis'].double().numpy(), kx, rtol=1e-4)
    assert rep.groups['a'] == ['a', 'd'] and rep.groups['d'] == ['a', 'd'] and rep.groups['b'] == ['b']
    assert rep.table.loc[0, 'top_channel'] == 2
    assert ranked[0] == 'b'


def test_severity_definition():
    assert outlier_severity(torch.tensor([1., 2., 3., 40.])) == 20.0
    assert outlier_severity(torch.tensor([4., 4., 4.])) == 1.0
    assert outlier_severity(torch.tensor([0., 0., 1.])) == math.inf
    with pytest.raises(ValueError): outlier_severity(torch.tensor([]))


def test_planted_outlier_ranks_first_on_llama(llama, ids):
    rep = OutlierReport(llama, ids)
    assert set(rep.names[:2]) == {'model.layers.1.mlp.gate_proj', 'model.layers.1.mlp.up_proj'}
    assert rep.table.loc[0, 'top_channel'] == 5
    assert rep.groups['model.layers.0.self_attn.v_proj'] == [f'model.layers.0.self_attn.{p}_proj' for p in 'qkv']
    assert rep.groups['model.layers.1.mlp.up_proj'] == ['model.layers.1.mlp.gate_proj', 'model.layers.1.mlp.up_proj']
    assert rep.groups['model.layers.1.mlp.down_proj'] == ['model.layers.1.mlp.down_proj']
    # inputs() equals what a plain pre-hook sees
    seen = []
    name = 'model.layers.1.self_attn.o_proj'
    h = llama.get_submodule(name).register_forward_pre_hook(lambda mod, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad(): llama(ids)
    h.remove()
    torch.testing.assert_close(rep.inputs(name), seen[0].float())


@pytest.mark.parametrize('alpha', [0.0, 0.25, 0.5, 0.9, 1.0])
def test_smoothing_preserves_the_layer_output(llama, ids, alpha):
    rep = OutlierReport(llama, ids)
    for name in ('model.layers.1.mlp.gate_proj', 'model.layers.0.self_attn.q_proj', 'model.layers.1.mlp.down_proj'):
        X, W = rep.inputs(name).double(), llama.get_submodule(name).weight.detach().double()
        sm = rep.smooth(name, alpha)
        s = sm['scales'].double()
        torch.testing.assert_close((X / s) @ (W * s).T, X @ W.T, rtol=1e-9, atol=1e-9)
        # the scales are SmoothQuant's formula, max |W_j| taken over the layer's input group
        a = X.abs().amax(0)
        wg = torch.stack([llama.get_submodule(n).weight.detach().double().abs().amax(0) for n in sm['group']]).amax(0)
        ref = (a.pow(alpha) / wg.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)
        torch.testing.assert_close(s, ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(sm['act_absmax_smoothed'].double(), a / s, rtol=1e-5, atol=0)
        torch.testing.assert_close(sm['w_absmax_smoothed'].double(), W.abs().amax(0) * s, rtol=1e-5, atol=0)
        if alpha == 0.5: torch.testing.assert_close((a / s), (a * wg).sqrt(), rtol=1e-5, atol=0)


def test_preview_matches_what_smoothquant_folds(llama, ids):
    "The preview's scales are the ones kdq_bench.ptq.smoothquant folds into the model (scale_only: FP function unchanged)."
    rep = OutlierReport(llama, ids)
    m2 = copy.deepcopy(llama)
    log = []
    smoothquant(m2, ids, alpha=0.5, scale_only=True, report=log, progress=False)
    for r in log:
        first = 'self_attn.q_proj' if r['group'] == 'qkv' else 'mlp.gate_proj'
        name = f"model.layers.{r['layer']}.{first}"
        sm = rep.smooth(name, 0.5)
        assert sm['act_absmax_smoothed'].max().item() == pytest.approx(r['act_max_smoothed'], rel=1e-4)
        for n in sm['group']:
            torch.testing.assert_close(m2.get_submodule(n).weight, llama.get_submodule(n).weight * sm['scales'], rtol=1e-5, atol=1e-7)
    with torch.no_grad(): torch.testing.assert_close(m2(ids).logits, llama(ids).logits, rtol=1e-4, atol=1e-4)


def test_format_sqnr_against_hand_quantization(llama, ids):
    rep = OutlierReport(llama, ids)
    name = rep.names[0]
    X, W = rep.inputs(name).double(), llama.get_submodule(name).weight.detach().double()
    def q_tensor(x, bits=8):                        # symmetric per-tensor integer grid, by hand
        qmax = 2 ** (bits - 1) - 1
        s = x.abs().max() / qmax
        return (x / s).round().clamp(-qmax - 1, qmax) * s
    def q_rows(x, bits=8):                          # symmetric per-row (per output channel / per token)
        qmax = 2 ** (bits - 1) - 1
        s = x.abs().amax(1, keepdim=True) / qmax
        return (x / s).round().clamp(-qmax - 1, qmax) * s
    def db(x, y): return 10 * math.log10((x ** 2).sum().item() / ((x - y) ** 2).sum().item())
    tab = rep.format_sqnr(name, ['int8-tensor', 'int8']).set_index('format')
    for fmt, q in (('int8-tensor', q_tensor), ('int8', q_rows)):
        assert tab.loc[fmt, 'w_sqnr'] == pytest.approx(db(W, q(W)), abs=0.02)
        assert tab.loc[fmt, 'x_sqnr'] == pytest.approx(db(X, q(X)), abs=0.02)
        assert tab.loc[fmt, 'out_sqnr'] == pytest.approx(db(X @ W.T, q(X) @ q(W).T), abs=0.02)
    s = rep.smooth(name, 0.5)['scales'].double()
    sm = rep.format_sqnr(name, 'int8-tensor', alpha=0.5).iloc[0]
    assert sm['out_sqnr'] == pytest.approx(db(X @ W.T, q_tensor(X / s) @ q_tensor(W * s).T), abs=0.02)
    assert sm['out_sqnr'] > tab.loc['int8-tensor', 'out_sqnr'] + 3          # smoothing helps the outlier layer
    full = rep.format_sqnr(name)
    assert list(full['format']) == DASHBOARD_FORMATS and full[['w_sqnr', 'x_sqnr', 'out_sqnr']].notna().all().all()


def test_outlier_figure_draws_the_report(llama, ids):
    rep = OutlierReport(llama, ids)
    name = 'model.layers.1.mlp.down_proj'
    fig = outlier_figure(rep, name, fmt='nvfp4', alpha=0.7)
    sm, tab = rep.smooth(name, 0.7), rep.format_sqnr(name).set_index('format')
    np.testing.assert_allclose(np.asarray(fig.data[2].y), sm['act_absmax'].double().numpy())
    np.testing.assert_allclose(np.asarray(fig.data[3].y), sm['act_absmax_smoothed'].double().numpy())
    np.testing.assert_allclose(np.asarray(fig.data[5].y), sm['w_absmax_smoothed'].double().numpy())
    assert list(fig.data[10].x) == DASHBOARD_FORMATS
    np.testing.assert_allclose(fig.data[10].y, np.minimum(tab['out_sqnr'].to_numpy(), 99.))
    assert fig.data[11].x == ('nvfp4',)
    red = [c for c, n in zip(fig.data[0].marker.color, fig.data[0].y) if n == name]
    assert red == ['#d62728']


def test_outlier_widget_follows_its_controls(llama, ids):
    w = OutlierInspector(llama, ids, fmt='int8-tensor')
    assert w.error is None and w.fig is not None
    y0 = np.asarray(w.fig.data[3].y).copy()
    w.alpha_slider.value = 0.9
    assert not np.allclose(np.asarray(w.fig.data[3].y), y0)
    np.testing.assert_allclose(np.asarray(w.fig.data[3].y), w.report.smooth(w.layer_box.value, 0.9)['act_absmax_smoothed'].double().numpy())
    w.fmt_box.value = 'nf4-g64'
    assert w.fig.data[11].x == ('nf4-g64',) and w.error is None
    w.layer_box.value = 'model.layers.0.self_attn.o_proj'
    assert len(w.fig.data[2].y) == 32 and 'model.layers.0.self_attn.o_proj' in w.fig.layout.title.text


@pytest.mark.parametrize('make, msg', [
    (lambda m, i: OutlierInspector(nn.Sequential(nn.Embedding(97, 8)), i), 'has no nn.Linear layer'),
    (lambda m, i: OutlierInspector(m, torch.randint(0, 97, (1, 65))), "model's context is 64 tokens"),
    (lambda m, i: OutlierInspector(m, i, layer='model.layers.0.mlp.nope'), 'close matches'),
    (lambda m, i: OutlierInspector(m, i, fmt='int9'), 'int9'),
    (lambda m, i: OutlierInspector(m, i, alpha=1.5), 'alpha must be'),
])
def test_outlier_widget_bad_input_shows_an_error_line(llama, ids, make, msg):
    w = make(llama, ids)
    assert w.fig is None and len(w.children) == 1
    assert 'kdq-error' in w.children[0].value and html.escape(msg) in w.children[0].value and msg in w.error


def test_outlier_widget_unknown_typed_layer(llama, ids):
    w = OutlierInspector(llama, ids)
    w.layer_box.value = 'model.layers.1.mlp.down_prj'
    assert 'kdq-error' in w.status.value and 'model.layers.1.mlp.down_proj' in w.error
    w.layer_box.value = 'model.layers.1.mlp.down_proj'
    assert w.error is None and 'kdq-status' in w.status.value


def test_data_functions_raise_value_errors(llama, ids):
    with pytest.raises(ValueError, match='has no nn.Linear'): linear_names(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match='context is 64'): OutlierReport(llama, torch.zeros(1, 80, dtype=torch.long))
    with pytest.raises(ValueError, match='0..96'): check_batch(llama, torch.tensor([[5, 97]]))
    with pytest.raises(ValueError, match='token ids'): check_batch(llama, torch.ones(2, 3))
    with pytest.raises(ValueError, match='not linear layers'): OutlierReport(llama, ids, names=['model.layers.0.mlp'])
    rep = OutlierReport(llama, ids, names='model.layers.*.mlp.down_proj')
    assert sorted(rep.names) == ['model.layers.0.mlp.down_proj', 'model.layers.1.mlp.down_proj']
    with pytest.raises(ValueError, match='alpha must be'): rep.smooth(rep.names[0], -0.1)
    with pytest.raises(ValueError, match='no linear layer named'): rep.layer('lm_head')


# ---------------------------------------------------------------- entropy inspector

def hand_entropy(z, tau):
    p = [math.exp(v / tau) for v in z]
    s = sum(p)
    return -sum(q / s * math.log(q / s) for q in p if q > 0)


def test_entropy_per_tau_hand_computed():
    z = [[math.log(3), 0.0, -1.0], [2.0, 2.0, 2.0], [5.0, 0.0, 0.0]]
    logits = torch.tensor([z])
    for tau in (1.0, 2.0, 3.5, 10.0, 100.0):
        H = entropy_at(logits, tau)
        np.testing.assert_allclose(H[0].double().numpy(), [hand_entropy(r, tau) for r in z], rtol=1e-5)
    # the two-token case in closed form
    two = torch.tensor([[[math.log(3), 0.0]]])
    assert entropy_at(two, 1.0).item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), rel=1e-6)
    p = math.sqrt(3) / (1 + math.sqrt(3))
    assert entropy_at(two, 2.0).item() == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)), rel=1e-6)
    # the table: mean entropy, quantiles and the band's verdict per tau, by hand
    g = torch.Generator().manual_seed(0)
    L = torch.randn(3, 7, 11, generator=g) * 4
    tab = entropy_table(L, taus=(1, 2, 5))
    for _, row in tab.iterrows():
        h = np.array([hand_entropy(r, row['tau']) for r in L.reshape(-1, 11).tolist()])
        assert row['mean_entropy'] == pytest.approx(h.mean(), rel=1e-5)
        assert row['median'] == pytest.approx(np.median(h), rel=1e-5)
        assert row['p05'] == pytest.approx(np.quantile(h, 0.05), rel=1e-5)
        hn = h / math.log(11)
        assert row['frac_one_hot'] == pytest.approx((hn < 0.05).mean())
        assert row['frac_uniform'] == pytest.approx((hn > 0.95).mean())
        assert row['ok'] == ((hn < 0.05).mean() <= 0.5 and (hn > 0.95).mean() <= 0.5)
        assert row['band_low'] == pytest.approx(0.05 * math.log(11)) and row['band_high'] == pytest.approx(0.95 * math.log(11))
    assert list(entropy_table(L)['tau']) == list(TAUS) and TAUS[0] == 1.0 and TAUS[-1] == 10.0


@pytest.mark.parametrize('bad', [0, -1, 100.0001, float('nan'), float('inf'), '4', None, True])
def test_tau_outside_range_rejected(bad):
    with pytest.raises(ValueError, match=r'\(0, 100\]'): check_tau(bad)
    with pytest.raises(ValueError, match=r'\(0, 100\]'): entropy_at(torch.zeros(1, 1, 3), bad)


def test_tau_bounds_accepted():
    assert check_tau(100) == 100.0 and check_tau(1e-6) == 1e-6 and check_tau(np.float32(4)) == 4.0


def test_top_soft_targets_by_hand():
    z = torch.tensor([[[0.0, 3.0, 1.0, 2.0, -1.0]]])
    top = top_soft_targets(z, 2.0, k=3)
    p = np.exp(np.array([0., 3., 1., 2., -1.]) / 2); p /= p.sum()
    assert list(top['token_id']) == [1, 3, 2]
    np.testing.assert_allclose(top['prob'], p[[1, 3, 2]], rtol=1e-12)
    assert list(top['logit']) == [3.0, 2.0, 1.0]
    with pytest.raises(ValueError, match='pos must be'): top_soft_targets(z, 2.0, pos=5)
    with pytest.raises(ValueError, match='k must be'): top_soft_targets(z, 2.0, k=6)


def test_dashboard_band_is_what_the_trainer_enforces(monkeypatch):
    "The trainer calls check_soft_targets with its defaults; the dashboard shows that band and the same verdict."
    calls = []
    real = trainer_mod.check_soft_targets
    def spy(z, tau, **kw):
        calls.append((z.detach().clone(), tau, kw))
        return real(z, tau, **kw)
    monkeypatch.setattr(trainer_mod, 'check_soft_targets', spy)
    teacher = tiny_llama(sharpen=30.0)
    toy = (np.cumsum(np.random.default_rng(0).integers(1, 4, 2048)) % 97).astype(np.int32)
    cfg = TrainConfig.from_dict({'training': {'method': 'kd+qat', 'steps': 1, 'batch_size': 2, 'seq_len': 16},
                                 'quantization': {'weights': 'int4-g16'}, 'distillation': {'temperature': 3.0}})
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res = Trainer(cfg, teacher=teacher, train_tokens=toy, progress=False).fit()
    assert len(calls) == 1
    z, tau, kw = calls[0]
    assert tau == 3.0 and set(kw) <= {'action'}            # no band override: the defaults apply
    band = soft_target_band()
    assert band == {'low': 0.05, 'high': 0.95, 'max_frac': 0.5}
    row = entropy_table(z, taus=[tau]).iloc[0]
    for k in ('ok', 'mean_entropy', 'frac_one_hot', 'frac_uniform', 'message'):
        assert row[k] == res.soft_targets[k]
    w = EntropyInspector(teacher, torch.zeros(1, 4, dtype=torch.long), logits=z, tau=3.0)
    assert html.escape(res.soft_targets['message']) in w.status.value


def test_entropy_figure_and_widget(llama, ids):
    teacher = tiny_llama(sharpen=60.0)
    L = teacher_logits(teacher, ids)
    with torch.no_grad(): torch.testing.assert_close(L, teacher(ids).logits.float())
    fig = entropy_figure(L, tau=3.0, seq=1, pos=4, k=5)
    np.testing.assert_allclose(np.asarray(fig.data[0].y), entropy_at(L, 3.0)[1].double().numpy())
    np.testing.assert_allclose(np.asarray(fig.data[4].x), (entropy_at(L, 3.0).flatten().double() / math.log(97)).numpy())
    top = top_soft_targets(L, 3.0, 1, 4, 5)
    np.testing.assert_allclose(fig.data[10].x, top['prob'][::-1].to_numpy())
    w = EntropyInspector(teacher, ids, tau=4.0)
    h0 = np.asarray(w.fig.data[4].x).copy()
    w.tau_slider.value = 1.5
    np.testing.assert_allclose(np.asarray(w.fig.data[4].x), (entropy_at(L, 1.5).flatten().double() / math.log(97)).numpy(), rtol=1e-6)
    assert not np.allclose(h0, np.asarray(w.fig.data[4].x))
    chk = check_soft_targets(L, 1.5, action='none')
    assert html.escape(chk['message']) in w.status.value
    w.pos_slider.value = 3
    assert w.fig.data[1].x == (3,)


@pytest.mark.parametrize('kw, msg', [(dict(tau=0), '(0, 100]'), (dict(tau=101), '(0, 100]'), (dict(tau=-2), '(0, 100]'),
                                     (dict(k=0), 'k must be'), (dict(lowish=0.1), 'unknown band settings')])
def test_entropy_widget_bad_input(llama, ids, kw, msg):
    w = EntropyInspector(llama, ids, **kw)
    assert w.fig is None and 'kdq-error' in w.children[0].value and msg in w.error


def test_entropy_widget_batch_too_long(llama):
    w = EntropyInspector(llama, torch.randint(0, 97, (2, 65)))
    assert w.fig is None and "model's context is 64 tokens" in w.error


# ---------------------------------------------------------------- training monitor

@pytest.fixture(scope='module')
def run_records(tmp_path_factory):
    teacher = tiny_llama(outlier=1.0)
    toy = (np.cumsum(np.random.default_rng(0).integers(1, 4, 4096)) % 97).astype(np.int32)
    out = tmp_path_factory.mktemp('run')
    cfg = TrainConfig.from_dict({'training': {'method': 'kd+qat', 'steps': 40, 'batch_size': 2, 'seq_len': 16,
                                              'output_dir': str(out), 'checkpoint_every': 0},
                                 'quantization': {'weights': 'int4-g16'}, 'optimizer': {'lr': 1e-3}})
    mon = TrainingMonitor(steps=40)
    mon.widget
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res = Trainer(cfg, teacher=teacher, train_tokens=toy, callbacks=[mon], progress=False).fit()
    return mon, res, out / 'metrics.jsonl'


def test_monitor_reads_the_trainers_real_records(run_records):
    mon, res, path = run_records
    assert len(mon.records) == 40 == len(res.history)
    assert mon.error is None and 'kdq-status' in mon.widget.children[0].value and '40 records' in mon.widget.children[0].value
    df = mon.frame()
    for col in MONITOR_KEYS:
        if col in ('val_nll', 'phase'): continue
        assert df[col].notna().all(), f'{col}: the trainer record has none of {MONITOR_KEYS[col]}'
    hist = res.history
    np.testing.assert_allclose(df['total'], [r['loss'] for r in hist])
    np.testing.assert_allclose(df['quant_error'], [r['quant'] for r in hist])
    np.testing.assert_allclose(df['ratio'], [r['ratio'] for r in hist])
    np.testing.assert_allclose(df['lam'], [r['lam'] for r in hist])
    assert list(df['phase']) == [r['phase'] for r in hist]
    assert {'warmup', 'joint', 'final'} == set(df['phase'])
    # the file the trainer writes gives the same table
    assert monitor_series(path).equals(monitor_series(hist))
    # the live widget shows every step after the final (forced) redraw
    assert mon.stats['redraws'] >= 2
    np.testing.assert_array_equal(np.asarray(mon.widget.children[1].data[0].x), np.arange(1, 41))
    np.testing.assert_allclose(np.asarray(mon.widget.children[1].data[0].y), df['total'])
    spans = phase_spans(df['step'], df['phase'])
    assert [s[0] for s in spans] == ['warmup', 'joint', 'final'] and spans[0][1] == 0.5 and spans[-1][2] == 40.5
    assert len(mon.widget.children[1].layout.shapes) == 3
    fig = monitor_figure(hist)
    assert len(fig.data) == 13 and len(fig.layout.shapes) == 3
    np.testing.assert_allclose(np.asarray(fig.data[6].y), [3.0, 3.0])        # the ratio threshold line


def test_normalize_record_aliases_and_missing():
    r = normalize_record({'loss/total': 2.5, 'quant_error': 0.1, 'lambda': 0.9, 'gamma': 0.2, 'phase': 'joint',
                          'tokens_per_s': torch.tensor(1000.0)}, index=4)
    assert (r['step'], r['total'], r['quant_error'], r['lam'], r['gam'], r['tokens_per_s']) == (5, 2.5, 0.1, 0.9, 0.2, 1000.0)
    assert math.isnan(r['task']) and math.isnan(r['val_nll'])
    assert math.isnan(normalize_record({'loss': 'n/a'})['total'])
    with pytest.raises(ValueError, match='must be a dict'): normalize_record([1])


def fake_records(n):
    return [dict(step=s, phase='warmup' if s <= n // 10 else 'joint', loss=1.0 / s, task=0.5, distill=0.5, quant=0.01,
                 ratio=1.0, lam=0.5, gam=0.3, tokens_per_s=1e3, lr=1e-3) for s in range(1, n + 1)]


def test_monitor_throttle():
    recs = fake_records(50)
    m = TrainingMonitor(every_s=1e9, max_overhead=0, steps=50); m.widget
    for r in recs: m(r)
    assert m.stats['redraws'] == 2                    # the first record and the last step only
    m = TrainingMonitor(every_s=0, max_overhead=0); m.widget
    for r in recs: m(r)
    assert m.stats['redraws'] == 50 and m.error is None   # no throttle: every record
    m = TrainingMonitor(every_s=0, max_overhead=0, every_steps=10); m.widget
    for r in recs: m(r)
    assert m.stats['redraws'] == 5
    m = TrainingMonitor(every_s=1e9); m.widget
    for r in recs: m(r)
    assert m.stats['redraws'] == 1 and len(m.widget.children[1].data[0].x) == 1
    m.flush()
    assert m.stats['redraws'] == 2 and len(m.widget.children[1].data[0].x) == 50
    m = TrainingMonitor(every_s=1e9)                  # never displayed: nothing is drawn
    for r in recs: m(r)
    assert m.stats['redraws'] == 0 and len(m.records) == 50


def test_monitor_overhead_rule():
    "Redraws are spaced by at least last_redraw_time / max_overhead."
    m = TrainingMonitor(every_s=0.0, max_overhead=0.02); m.widget
    m(fake_records(1)[0])
    now = time.perf_counter()
    m._last_cost, m._last_t = 0.1, now - 1.0          # a 100 ms redraw one second ago: wait 5 s
    assert not m._due(now)
    m._last_t = now - 5.1
    assert m._due(now)


def test_monitor_decimates_long_runs():
    m = TrainingMonitor(every_s=1e9, max_points=100); m.widget
    for r in fake_records(1000): m(r)
    m.flush()
    x = np.asarray(m.widget.children[1].data[0].x)
    assert len(x) <= 101 and x[0] == 1 and x[-1] == 1000
    assert len(monitor_series(fake_records(1000), max_points=100)) <= 101


def test_monitor_never_raises():
    m = TrainingMonitor(every_s=0, max_overhead=0); m.widget
    m('not a record')
    assert 'must be a dict' in m.error and 'kdq-error' in m.widget.children[0].value
    m(fake_records(1)[0])
    assert len(m.records) == 1
    with pytest.raises(ValueError): TrainingMonitor(every_s=-1)


def test_monitor_overhead_is_small_on_a_real_run():
    "Throttled, the monitor's own time stays a few percent of a fast tiny run; unthrottled it does not."
    teacher = tiny_llama(outlier=1.0)
    toy = (np.cumsum(np.random.default_rng(0).integers(1, 4, 4096)) % 97).astype(np.int32)
    cfg = TrainConfig.from_dict({'training': {'method': 'kd+qat', 'steps': 60, 'batch_size': 4, 'seq_len': 32},
                                 'quantization': {'weights': 'int4-g16'}, 'optimizer': {'lr': 1e-3}})
    shares = {}
    for name, mon in (('throttled', TrainingMonitor(steps=60)), ('every step', TrainingMonitor(every_s=0, max_overhead=0))):
        mon.widget
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            Trainer(cfg, teacher=teacher, train_tokens=toy, callbacks=[mon], progress=False).fit()
        shares[name] = mon.stats['callback_s'] / (time.perf_counter() - t0)
    print(shares)
    assert shares['throttled'] < 0.06
    assert shares['every step'] > shares['throttled']
