"Tests of kdq_bench.trainer on tiny random Llama models (CPU, seconds each)."
import copy, json, math, os, signal
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kdq_bench.data import batch_at, num_windows, window_ids, windows
from kdq_bench.quantizers import quantize_model, fake_quant_layers, fake_quant, FakeQuantLinear
from kdq_bench.losses import quant_penalty, QuantPenaltyHooks
from kdq_bench.teacher_cache import TeacherCache, weights_hash
from kdq_bench.testing import tiny_llama
from kdq_bench.trainer import (TrainConfig, Trainer, TrainingDiverged, lr_at, list_checkpoints, latest_checkpoint,
                               load_student_weights, OptimizerConfig, _enable_checkpointing)

torch.set_num_threads(1)
FIXTURE = Path(__file__).parent/'fixtures'/'training_config.yaml'
V = 97

def tiny(seed=0, vocab=V, hidden=32, layers=2):
    return tiny_llama(vocab=vocab, hidden=hidden, layers=layers, intermediate=64, heads=2, kv_heads=2, seed=seed)

def toks(n=4096, seed=0):
    return (np.cumsum(np.random.default_rng(seed).integers(1, 4, n)) % V).astype(np.int32)

def cfg(**over):
    base = {'training': {'method': 'kd+qat', 'steps': 10, 'batch_size': 4, 'seq_len': 32},
            'quantization': {'weights': 'int4-g16'}, 'optimizer': {'lr': 1e-3},
            'distillation': {'check_soft_targets': 'off'}}   # a random teacher's soft targets are near uniform
    return TrainConfig.from_dict(base).override(**over)

@pytest.fixture(scope='module')
def teacher(): return tiny()

@pytest.fixture(scope='module')
def tokens(): return toks()

def fit(config, teacher, tokens, **kw):
    return Trainer(config, teacher=teacher, train_tokens=tokens, progress=False, **kw).fit()

def weights(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}

def max_diff(a, b): return max((a[k] - b[k]).abs().max().item() for k in a)

# --- configuration ---------------------------------------------------------------------------------------------------

def test_fixture_yaml_loads_and_round_trips():
    c = TrainConfig.from_yaml(FIXTURE)
    assert c.training.method == 'kd+qat' and c.quantization.weights == 'int3-g128'
    assert c.optimizer.lr == 2e-5 and c.optimizer.betas == [0.9, 0.95] and c.optimizer.grad_clip == 0.75
    assert TrainConfig.from_yaml(c.to_yaml()) == c

def test_defaults_are_the_seeds():
    c = TrainConfig()
    assert (c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.betas, c.optimizer.grad_clip) == (2e-5, 0.01, [0.9, 0.95], 0.75)
    assert (c.distillation.warmup, c.distillation.joint, c.distillation.final) == ([0.9, 0.1], [0.5, 0.3], [0.2, 0.1])
    assert (c.distillation.warmup_frac, c.distillation.final_frac, c.distillation.temperature) == (0.05, 0.10, 4.0)

@pytest.mark.parametrize('d, words', [
    ({'optimizer': {'learning_rate': 1e-4}}, ["'learning_rate'", "'optimizer'", "'lr'", "'grad_clip'"]),
    ({'training': {'stepz': 3}}, ["'stepz'", "'steps'", "'batch_size'"]),
    ({'distilation': {}}, ["'distilation'", "'distillation'", "'quantization'"]),
])
def test_unknown_keys_name_key_and_allowed(d, words):
    with pytest.raises(ValueError) as e: TrainConfig.from_dict(d)
    assert all(w in str(e.value) for w in words), str(e.value)

def test_types_and_values_are_checked():
    with pytest.raises(ValueError, match='training.steps must be int'): TrainConfig.from_dict({'training': {'steps': 1.5}})
    with pytest.raises(ValueError, match='training.method'): TrainConfig.from_dict({'training': {'method': 'gptq'}})
    with pytest.raises(ValueError, match='divisible'): TrainConfig.from_dict({'training': {'batch_size': 6, 'grad_accum': 4}})
    with pytest.raises(ValueError, match='fraction'): TrainConfig.from_dict({'quantization': {'fake_quant_start': 1.5}})
    with pytest.raises(ValueError, match='feature_layers'): TrainConfig.from_dict({'distillation': {'feature_layers': ['a'], 'cache_topk': 8}})
    assert TrainConfig.from_dict({'optimizer': {'lr': '3e-4'}}).optimizer.lr == 3e-4       # YAML 1.1 string float
    assert TrainConfig.from_dict({'optimizer': {'lr': 1}}).optimizer.lr == 1.0

@pytest.mark.parametrize('clip, warns', [(0.75, False), (0.5, False), (1.0, False), (0.3, True), (2.0, True)])
def test_grad_clip_outside_range_warns(clip, warns, recwarn):
    TrainConfig.from_dict({'optimizer': {'grad_clip': clip}})
    assert any('0.5-1.0' in str(w.message) for w in recwarn) == warns

def test_override():
    c = cfg(**{'optimizer.lr': 5e-4, 'training.steps': 3})
    assert (c.optimizer.lr, c.training.steps) == (5e-4, 3)
    with pytest.raises(ValueError, match="allowed keys"): cfg(**{'optimizer.lrr': 1})

# --- pure functions ------------------------------------------------------------------------------------------------

def test_lr_schedule_matches_formula():
    o = OptimizerConfig(lr=3e-4, warmup_frac=0.1, min_lr_ratio=0.2)
    T, W = 50, 5
    for s in range(T):
        ref = 3e-4 * (s + 1) / W if s < W else 0.2 * 3e-4 + 0.8 * 3e-4 * 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W)))
        assert lr_at(s, T, o) == pytest.approx(ref, rel=1e-12)
    assert lr_at(7, T, OptimizerConfig(lr=1.0, warmup_frac=0.1, schedule='constant')) == 1.0

@pytest.mark.parametrize('seq_len, bs, seed', [(32, 4, 0), (16, 7, 3), (64, 5, 11)])
def test_window_ids_match_batch_at(tokens, seq_len, bs, seed):
    n = num_windows(tokens, seq_len)
    for step in (0, 1, 9, 3 * n // bs + 1):
        assert torch.equal(windows(tokens, window_ids(n, step, bs, seed), seq_len), batch_at(tokens, step, bs, seq_len, seed))

def test_weights_hash_detects_one_ulp(teacher):
    t = copy.deepcopy(teacher)
    h = weights_hash(t)
    assert weights_hash(copy.deepcopy(t)) == h
    with torch.no_grad(): t.lm_head.weight.view(-1)[5] = torch.nextafter(t.lm_head.weight.view(-1)[5], torch.tensor(9.0))
    assert weights_hash(t) != h

# --- teacher cache ---------------------------------------------------------------------------------------------------

def test_teacher_cache_stores_topk_and_persists(teacher, tokens, tmp_path):
    c = TeacherCache.for_teacher(teacher, tokens, 32, 5, root=tmp_path)
    ids = np.array([0, 9, 2])
    assert c.fill(teacher, tokens, ids) == 3
    with torch.no_grad(): z = teacher(windows(tokens, ids, 32)).logits
    v, ix = z.topk(5, -1)
    got = c.get(ids)
    assert torch.equal(got.indices, ix)
    assert torch.allclose(got.values, v - v[..., :1], atol=2e-3)
    again = TeacherCache.for_teacher(teacher, tokens, 32, 5, root=tmp_path)        # reopened from disk
    assert again.path == c.path and again.fill(teacher, tokens, ids) == 0
    assert torch.equal(again.get(ids).values, got.values)
    assert TeacherCache.for_teacher(teacher, tokens, 32, 6, root=tmp_path).path != c.path
    with pytest.raises(ValueError, match='top-k'): TeacherCache.for_teacher(teacher, tokens, 32, V + 1, root=tmp_path)

def test_teacher_cache_tail_matches_full_logits(teacher, tokens, tmp_path):
    "The cached tail is the log of the tempered mass outside the top-k, in the frame of the shifted top-k values."
    cache = TeacherCache.for_teacher(teacher, tokens, 32, k=8, root=tmp_path, tau=2.0)
    ids = np.array([0, 5])
    cache.fill(teacher, tokens, ids)
    with torch.no_grad(): z = teacher(windows(tokens, ids, 32)).logits.float()
    got = cache.get(ids)
    v, ix = z.topk(8, -1)
    p = torch.softmax(z.double() / 2.0, -1)
    rest = 1 - p.gather(-1, ix).sum(-1)                                      # tail mass from the full softmax
    bucket = torch.cat([got.values.double() / 2.0, got.tail.double().unsqueeze(-1)], -1).softmax(-1)[..., -1]
    assert torch.allclose(bucket, rest, atol=2e-4) and got.tau == 2.0
    assert TeacherCache.for_teacher(teacher, tokens, 32, k=8, root=tmp_path, tau=4.0).path != cache.path


def test_cached_full_vocab_equals_live_teacher(teacher, tokens, tmp_path, monkeypatch):
    monkeypatch.setenv('KDQ_BENCH_CACHE', str(tmp_path))
    live = fit(cfg(**{'training.steps': 5}), teacher, tokens)
    cached = fit(cfg(**{'training.steps': 5, 'distillation.cache_topk': V}), teacher, tokens)
    for a, b in zip(live.history, cached.history): assert a['loss'] == pytest.approx(b['loss'], abs=1e-4)
    assert list((tmp_path/'teacher_topk').iterdir())

def test_cached_run_does_not_call_teacher_after_filling(teacher, tokens, tmp_path, monkeypatch):
    monkeypatch.setenv('KDQ_BENCH_CACHE', str(tmp_path))
    t = copy.deepcopy(teacher)
    tr = Trainer(cfg(**{'training.steps': 4, 'distillation.cache_topk': 8, 'distillation.check_soft_targets': 'off'}),
                 teacher=t, train_tokens=tokens, progress=False)
    tr._prepare(0)                                  # fills the cache for every step of the run
    calls = []
    t.register_forward_hook(lambda *a: calls.append(1))
    tr.fit()
    assert calls == []

# --- the quantization penalty --------------------------------------------------------------------------------------

@pytest.mark.parametrize('ckpt', [False, True])
def test_penalty_hooks_gradient_equals_direct_formula(teacher, tokens, ckpt):
    def student():
        s = copy.deepcopy(teacher).train()
        for p in s.parameters(): p.requires_grad_(True)
        return quantize_model(s, 'int4-g16')
    s1, s2 = student(), student()
    if ckpt: _enable_checkpointing(s1)
    x = windows(tokens, [1, 2], 32)
    h = QuantPenaltyHooks(s1)
    with h.collect(gamma=0.7): s1(input_ids=x, labels=x).loss.backward()
    (s2(input_ids=x, labels=x).loss + 0.7 * quant_penalty(s2)).backward()
    for p1, p2 in zip(s1.parameters(), s2.parameters()): torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7)
    assert h.mean() == pytest.approx(quant_penalty(s2).item(), rel=1e-6)

# --- the loop ------------------------------------------------------------------------------------------------------

def test_first_step_loss_matches_independent_formulas(teacher, tokens):
    "Before any update the logged components equal CE, τ²·KL(p_T‖p_S) and quant_penalty computed here."
    c = cfg(**{'quantization.fake_quant_start': 0, 'training.steps': 20})   # warm-up: step 0 (5% of 20)
    tr = Trainer(c, teacher=teacher, student=tiny(seed=7).train(), train_tokens=tokens, progress=False)   # a student unlike the teacher
    s0 = copy.deepcopy(tr.student)
    rec = tr.train_step(0)
    x = batch_at(tokens, 0, 4, 32, 0)
    with torch.no_grad():
        zs, zt = s0(input_ids=x).logits[:, :-1].double(), teacher(x).logits[:, :-1].double()
        task = F.cross_entropy(zs.reshape(-1, V), x[:, 1:].reshape(-1)).item()
        tau = 4.0
        pt = F.softmax(zt / tau, -1)
        kl = (pt * (F.log_softmax(zt / tau, -1) - F.log_softmax(zs / tau, -1))).sum(-1).mean().item() * tau ** 2
        q = quant_penalty(s0).item()
    assert (rec['lam'], rec['gam']) == (0.9, 0.1) and rec['quant_enabled']
    assert rec['task'] == pytest.approx(task, rel=1e-5)
    assert rec['distill'] == pytest.approx(kl, rel=1e-4)
    assert rec['quant'] == pytest.approx(q, rel=1e-5)
    assert rec['loss'] == pytest.approx(task + 0.9 * kl + 0.1 * q, rel=1e-5)
    assert rec['ratio'] == pytest.approx(kl / task, rel=1e-4)

def test_teacher_frozen_unchanged_and_outside_optimizer(tokens):
    t = tiny(seed=1).train()
    for p in t.parameters(): p.requires_grad_(True)      # the trainer must freeze it
    h0 = weights_hash(t)
    tr = Trainer(cfg(), teacher=t, train_tokens=tokens, progress=False)
    assert not any(p.requires_grad for p in t.parameters()) and not t.training
    opt_ids = {id(p) for g in tr.optimizer.param_groups for p in g['params']}
    assert not opt_ids & {id(p) for p in t.parameters()}
    r = tr.fit()
    assert r.teacher_hash == h0 == weights_hash(t)

def test_teacher_change_is_detected(tokens):
    t = tiny(seed=2)
    def tamper(rec):
        if rec['step'] == 2:
            with torch.no_grad(): t.model.norm.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="teacher's weights changed"):
        fit(cfg(**{'training.steps': 3}), t, tokens, callbacks=[tamper])

def test_shared_parameters_rejected(teacher, tokens):
    with pytest.raises(ValueError, match='share'):
        Trainer(cfg(**{'training.method': 'kd'}), teacher=teacher, student=teacher, train_tokens=tokens, progress=False)

@pytest.mark.parametrize('start, expect', [(None, 1), (0, 0), (4, 4), (0.5, 10), (0.95, 19)])
def test_fake_quant_switches_on_at_start(teacher, tokens, start, expect):
    "None: at the end of the warm-up (5% of 20 steps = 1 step); an int is a step; a float a fraction of the steps; never is an error."
    seen = []
    tr = Trainer(cfg(**{'quantization.fake_quant_start': start, 'training.steps': 20}), teacher=teacher, train_tokens=tokens, progress=False,
                 callbacks=[lambda r: seen.append((r['quant_enabled'], {m.weight_quantizer.enabled for m in fake_quant_layers(tr.student).values()}))])
    tr.fit()
    assert [e for e, _ in seen] == [s >= expect for s in range(20)]
    assert all(layers == {e} for e, layers in seen)
    for never in (1.0, 20, 25):
        with pytest.raises(ValueError, match='would never quantize'): cfg(**{'quantization.fake_quant_start': never, 'training.steps': 20})

def test_warmup_student_is_full_precision(teacher, tokens):
    "While fake quantization is off the student computes exactly what its FP weights compute."
    tr = Trainer(cfg(**{'quantization.fake_quant_start': 5}), teacher=teacher, train_tokens=tokens, progress=False)
    from kdq_bench.quantizers import set_quant_enabled
    set_quant_enabled(tr.student, False)
    fp = copy.deepcopy(teacher)
    x = windows(tokens, [3], 32)
    with torch.no_grad(): assert torch.equal(tr.student(input_ids=x).logits, fp(input_ids=x).logits)

def test_methods(tokens):
    t = tiny(seed=3)
    calls = []
    qat = Trainer(cfg(**{'training.method': 'qat', 'training.steps': 3}), teacher=t, train_tokens=tokens, progress=False)
    t.register_forward_hook(lambda *a: calls.append(1))     # after the student was copied from it
    assert qat.teacher is None and fake_quant_layers(qat.student)
    r = qat.fit()
    assert calls == [] and all(h['distill'] == 0 and h['quant'] > 0 for h in r.history)
    kd = fit(cfg(**{'training.method': 'kd', 'training.steps': 3}), t, tokens)
    assert not fake_quant_layers(kd.student) and all(h['quant'] == 0 for h in kd.history)
    assert kd.history[0]['distill'] == 0 and kd.history[-1]['distill'] > 0      # an exact copy first, then it moves
    fp = fit(cfg(**{'training.method': 'fp-control', 'training.steps': 3}), t, tokens)
    assert all(h['quant'] == 0 and h['distill'] == 0 and h['loss'] == h['task'] for h in fp.history)

def test_grad_accumulation_equals_full_batch(teacher, tokens):
    a = fit(cfg(**{'training.steps': 4}), teacher, tokens)
    b = fit(cfg(**{'training.steps': 4, 'training.grad_accum': 2}), teacher, tokens)
    for x, y in zip(a.history, b.history): assert x['loss'] == pytest.approx(y['loss'], rel=1e-6)
    assert max_diff(weights(a.student), weights(b.student)) < 1e-6

def test_gradient_checkpointing_same_result(teacher, tokens):
    a = fit(cfg(**{'training.steps': 3}), teacher, tokens)
    b = fit(cfg(**{'training.steps': 3, 'training.gradient_checkpointing': True}), teacher, tokens)
    assert b.student.is_gradient_checkpointing
    assert max_diff(weights(a.student), weights(b.student)) < 1e-6

def test_bf16_autocast_runs_close_to_fp32(teacher, tokens):
    a = fit(cfg(**{'training.steps': 3}), teacher, tokens)
    b = fit(cfg(**{'training.steps': 3, 'training.precision': 'bf16'}), teacher, tokens)
    assert all(math.isfinite(h['loss']) for h in b.history)
    assert b.history[0]['task'] == pytest.approx(a.history[0]['task'], rel=2e-2)
    assert b.history[0]['task'] != a.history[0]['task']
    assert all(p.dtype == torch.float32 for p in b.student.parameters())

def test_adaptive_rule_lowers_lambda(teacher, tokens):
    low = fit(cfg(**{'training.steps': 10, 'distillation.adaptive_every': 2, 'distillation.ratio_threshold': 0.0}), teacher, tokens)
    high = fit(cfg(**{'training.steps': 10, 'distillation.adaptive_every': 2, 'distillation.ratio_threshold': 1e9}), teacher, tokens)
    joint_low = [h['lam'] for h in low.history if h['phase'] == 'joint']
    joint_high = [h['lam'] for h in high.history if h['phase'] == 'joint']
    assert set(joint_high) == {0.5}
    assert joint_low[0] == 0.5 and joint_low[-1] < 0.5 and all(a >= b for a, b in zip(joint_low, joint_low[1:]))

def test_records_logged_to_jsonl_and_callbacks(teacher, tokens, tmp_path):
    got = []
    r = fit(cfg(**{'training.output_dir': str(tmp_path/'run'), 'training.steps': 4}), teacher, tokens, callbacks=[got.append])
    rows = [json.loads(l) for l in (tmp_path/'run'/'metrics.jsonl').read_text().splitlines()]
    assert rows == got == r.history
    keys = {'step', 'phase', 'lr', 'lam', 'gam', 'loss', 'task', 'distill', 'quant', 'feature', 'ratio', 'quant_enabled',
            'grad_norm', 'tokens_per_s', 'step_time', 'tokens'}
    assert all(keys <= set(x) for x in rows) and [x['step'] for x in rows] == [1, 2, 3, 4]
    assert all(x['tokens_per_s'] == pytest.approx(4 * 32 / x['step_time']) for x in rows)
    assert (tmp_path/'run'/'config.yaml').exists()

def test_eval_every_logs_validation_perplexity(teacher, tokens):
    r = fit(cfg(**{'training.steps': 4, 'training.eval_every': 2, 'training.eval_tokens': 256}), teacher, tokens, eval_tokens=toks(600, seed=5))
    assert [('val_ppl' in h) for h in r.history] == [False, True, False, True]
    assert all(h['val_ppl'] == pytest.approx(math.exp(h['val_nll'])) for h in r.history if 'val_ppl' in h)

# --- checkpoints, interruption, resume, divergence -----------------------------------------------------------------

def resumable(out, steps=12):
    return cfg(**{'training.output_dir': str(out), 'training.steps': steps, 'training.checkpoint_every': 4,
                  'distillation.adaptive_every': 3, 'distillation.ratio_threshold': 0.0})

def test_sigterm_then_resume_equals_uninterrupted(teacher, tokens, tmp_path):
    full = fit(resumable(tmp_path/'a'), teacher, tokens)
    def term(rec):
        if rec['step'] == 6: os.kill(os.getpid(), signal.SIGTERM)
    part = fit(resumable(tmp_path/'b'), teacher, tokens, callbacks=[term])
    assert (part.status, part.step) == ('interrupted', 6)
    assert [p.name for p in list_checkpoints(tmp_path/'b')] == ['step-00000004', 'step-00000006']
    assert signal.getsignal(signal.SIGTERM) is not None     # handlers restored
    rest = Trainer(resumable(tmp_path/'b'), teacher=teacher, train_tokens=tokens, progress=False).fit(resume=True)
    assert rest.status == 'completed' and [h['step'] for h in rest.history] == list(range(1, 13))
    for a, b in zip(full.history, rest.history):
        for k in ('loss', 'task', 'distill', 'quant', 'lam', 'gam', 'lr', 'grad_norm'): assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9)
    assert max_diff(weights(full.student), weights(rest.student)) < 1e-6
    rows = [json.loads(l) for l in (tmp_path/'b'/'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == list(range(1, 13))

def test_keyboard_interrupt_checkpoints_and_resumes(teacher, tokens, tmp_path):
    full = fit(resumable(tmp_path/'a'), teacher, tokens)
    def ctrl_c(rec):
        if rec['step'] == 5: raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): fit(resumable(tmp_path/'b'), teacher, tokens, callbacks=[ctrl_c])
    assert latest_checkpoint(tmp_path/'b').name == 'step-00000005'
    rest = Trainer(resumable(tmp_path/'b'), teacher=teacher, train_tokens=tokens, progress=False).fit(resume=True)
    assert max_diff(weights(full.student), weights(rest.student)) < 1e-6

def test_checkpoint_files_pruning_and_no_temporaries(teacher, tokens, tmp_path):
    r = fit(cfg(**{'training.output_dir': str(tmp_path), 'training.steps': 10, 'training.checkpoint_every': 3,
                   'training.keep_checkpoints': 2}), teacher, tokens)
    assert [p.name for p in list_checkpoints(tmp_path)] == ['step-00000009', 'step-00000010']
    assert sorted(p.name for p in (tmp_path/'checkpoints').iterdir()) == ['step-00000009', 'step-00000010']   # nothing half-written, no temporary
    ck = r.checkpoint
    assert sorted(p.name for p in ck.iterdir()) == ['.kdq_bench.json', 'manifest.json', 'optimizer.pt', 'rng.safetensors', 'student.safetensors', 'trainer_state.json']
    state = json.loads((ck/'trainer_state.json').read_text())
    assert state['step'] == 10 and state['teacher_hash'] == weights_hash(teacher)
    osd = torch.load(ck/'optimizer.pt', weights_only=True)
    assert osd['state'] and osd['param_groups'][0]['lr'] == pytest.approx(r.history[-1]['lr'])
    s = quantize_model(tiny(seed=9).train(), 'int4-g16')
    load_student_weights(s, tmp_path)
    assert max_diff(weights(s), weights(r.student)) == 0

def test_resume_refuses_changed_config(teacher, tokens, tmp_path):
    fit(resumable(tmp_path, steps=4), teacher, tokens)
    with pytest.raises(ValueError, match='optimizer.lr'):
        Trainer(resumable(tmp_path, steps=4).override(**{'optimizer.lr': 0.5}), teacher=teacher, train_tokens=tokens, progress=False).fit(resume=True)
    with pytest.raises(ValueError, match='already holds checkpoints'): fit(resumable(tmp_path, steps=4), teacher, tokens)

def test_divergence_stops_with_last_good_checkpoint(teacher, tokens, tmp_path):
    holder = {}
    def poison(rec):
        if rec['step'] == 4: holder['tr'].student.model.norm.register_forward_hook(lambda m, i, o: o * float('inf'))
    tr = Trainer(cfg(**{'training.output_dir': str(tmp_path), 'training.checkpoint_every': 2, 'training.steps': 10}),
                 teacher=teacher, train_tokens=tokens, callbacks=[poison], progress=False)
    holder['tr'] = tr
    with pytest.raises(TrainingDiverged) as e: tr.fit()
    msg = str(e.value)
    assert 'diverged at step 5' in msg and 'loss is' in msg and 'step-00000004' in msg
    assert [p.name for p in list_checkpoints(tmp_path)] == ['step-00000002', 'step-00000004']
    rows = [json.loads(l) for l in (tmp_path/'metrics.jsonl').read_text().splitlines()]
    assert rows[-1]['step'] == 4
    s = quantize_model(tiny(seed=9).train(), 'int4-g16')
    load_student_weights(s, tmp_path/'checkpoints'/'step-00000004')
    assert all(torch.isfinite(p).all() for p in s.parameters())

# --- soft targets and feature distillation ---------------------------------------------------------------------------

def test_soft_target_check_runs_on_first_batch(teacher, tokens):
    "A random teacher at τ=4 is near uniform: 'warn' warns and reports, 'stop' refuses to train."
    with pytest.warns(UserWarning, match='near uniform'):
        tr = Trainer(cfg(**{'distillation.check_soft_targets': 'warn', 'training.steps': 1}), teacher=teacher, train_tokens=tokens, progress=False)
        r = tr.fit()
    assert r.soft_targets['ok'] is False and r.soft_targets['tau'] == 4.0
    with pytest.raises(ValueError, match='near uniform'):
        Trainer(cfg(**{'distillation.check_soft_targets': 'stop'}), teacher=teacher, train_tokens=tokens, progress=False).fit()

def test_feature_distillation_same_width(teacher, tokens):
    names = ['model.layers.0.mlp.down_proj', 'model.layers.1.self_attn.o_proj']
    r = fit(cfg(**{'distillation.feature_layers': names, 'distillation.feature_weight': 2.0, 'training.steps': 3}),
            tiny(seed=4), tokens, student=tiny(seed=5).train())
    h = r.history[0]
    assert h['feature'] > 0
    assert h['loss'] == pytest.approx(h['task'] + h['lam'] * (h['distill'] + 2.0 * h['feature']) + h['gam'] * h['quant'], rel=1e-6)
    auto = Trainer(cfg(**{'distillation.feature_layers': 'auto', 'distillation.feature_weight': 1.0}), teacher=tiny(seed=4),
                   train_tokens=tokens, progress=False)
    assert len(auto.pairs) == 4 and all(s == t for s, t in auto.pairs)      # 2 layers x (o_proj, down_proj)

def test_feature_projectors_trained_checkpointed_and_resumed(tokens, tmp_path):
    "A narrower student gets learned projectors: they are optimised, saved, and restored on resume."
    t = tiny(seed=6)
    c = cfg(**{'training.student': {'hidden_size': 16, 'intermediate_size': 32}, 'distillation.feature_layers': ['model.layers.1.mlp.down_proj'],
               'distillation.feature_weight': 1.0, 'training.output_dir': str(tmp_path/'a'), 'training.steps': 6, 'training.checkpoint_every': 3})
    tr = Trainer(c, teacher=t, train_tokens=tokens, progress=False)
    proj = list(tr.projectors.parameters())
    assert len(proj) == 1 and proj[0].shape == (32, 16)
    p0 = proj[0].detach().clone()
    full = tr.fit()
    assert not torch.equal(p0, proj[0]) and (full.checkpoint/'projectors.safetensors').exists()
    def term(rec):
        if rec['step'] == 3: os.kill(os.getpid(), signal.SIGTERM)
    Trainer(c.override(**{'training.output_dir': str(tmp_path/'b')}), teacher=t, train_tokens=tokens, callbacks=[term], progress=False).fit()
    rest = Trainer(c.override(**{'training.output_dir': str(tmp_path/'b')}), teacher=t, train_tokens=tokens, progress=False)
    r = rest.fit(resume=True)
    for a, b in zip(full.history, r.history): assert a['loss'] == pytest.approx(b['loss'], rel=1e-6)
    assert torch.allclose(list(rest.projectors.parameters())[0], proj[0], atol=1e-7)

def test_bf16_teacher_precision(teacher, tokens, tmp_path):
    "teacher_precision='bf16': the teacher runs under bf16 autocast, the student stays fp32; the cache is keyed by it."
    a = fit(cfg(**{'training.steps': 2, 'training.method': 'kd'}), teacher, tokens)
    b = fit(cfg(**{'training.steps': 2, 'training.method': 'kd', 'distillation.teacher_precision': 'bf16'}), teacher, tokens)
    assert a.history[0]['task'] == b.history[0]['task']                      # same student computation
    assert a.history[0]['distill'] != b.history[0]['distill']                # other soft targets
    assert all(p.dtype == torch.float32 for p in b.student.parameters())
    c32 = TeacherCache.for_teacher(teacher, tokens, 32, 4, root=tmp_path, precision='fp32')
    c16 = TeacherCache.for_teacher(teacher, tokens, 32, 4, root=tmp_path, precision='bf16')
    assert c32.path != c16.path
    with pytest.raises(ValueError, match='teacher_precision'): cfg(**{'distillation.teacher_precision': 'fp16'})
