"""The comparison study end to end on a tiny teacher: `kdq-bench compare` through papermill, the report checked against
a direct evaluation of the saved artifacts, resume, refusal, interruption, and the summary statistics."""
import json, math, os, statistics
from pathlib import Path

import nbformat
import pytest
import torch

import kdq_bench.benchmarks as B
from kdq_bench.benchmarks import StudyConfig, run_study, summary, markdown_table
from kdq_bench.cli import main
from kdq_bench.data import tokenize_split
from kdq_bench.evaluate import perplexity
from kdq_bench.export import load_quantized, read_quant_config
from kdq_bench.models import load_teacher
from kdq_bench.downstream import evaluate_tasks, study_columns

ARGS = ['--corpus', 'shakespeare', '--weights', 'int3-g128', '--steps', '8', '--batch-size', '4', '--seq-len', '32',
        '--lr', '1e-3', '--scale-lr', '1e-3', '--tau', '2', '--seeds', '2', '--eval-tokens', '2048', '--eval-seq-len', '32',
        '--calib-samples', '8', '--calib-seq-len', '32', '--blockwise-samples', '4', '--blockwise-seq-len', '32', '--blockwise-lr', '1e-3',
        '--blockwise-scale-lr', '1e-3', '--eval-corpora', '', '--task-examples', '20', '--adapt-steps', '20', '--adapt-lr', '1e-3', '--latency-runs', '1',
        '--threads', '1', '--embedding', 'int8']


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher.path


@pytest.fixture(scope="module")
def study(teacher_dir, tmp_path_factory):
    "One study through the console entry point and papermill (about a minute)."
    out = tmp_path_factory.mktemp("study") / "run"
    assert main(['compare', '--teacher', str(teacher_dir), *ARGS, '--out', str(out)]) == 0
    return out, json.loads((out / 'metrics.json').read_text())


def test_study_files_and_rows(study):
    out, m = study
    names = {p.name for p in out.iterdir()}
    assert {'metrics.json', 'table.md', 'report.html', 'compare.ipynb'} <= names
    got = [(r['method'], r['weights'], r['seed']) for r in m['rows']]
    assert got == [('teacher', 'fp32', None), ('rtn', 'int8', None), ('rtn', 'int3-g128', None), ('gptq', 'int3-g128', None),
                   ('awq', 'int3-g128', None), ('fp-control', 'fp32', 0), ('qat', 'int3-g128', 0), ('kd+qat', 'int3-g128', 0),
                   ('fp-control', 'fp32', 1), ('qat', 'int3-g128', 1), ('kd+qat', 'int3-g128', 1)]
    for r in m['rows']:
        for k in ('method', 'weights', 'acts', 'ppl', 'delta_pct', 'kl', 'top1', 'size_bytes', 'seconds', 'tokens', 'eval_tokens'): assert k in r, k
    assert m['teacher']['adaptation']['steps_run'] >= 10 and m['corpus'] == 'shakespeare'
    assert m['versions']['torch'] == torch.__version__ and m['params']['seeds'] == [0, 1]
    # the KD+QAT artifacts are named with 'kd' and load with the export module
    kd = [r['artifact'] for r in m['rows'] if r['method'] == 'kd+qat']
    assert kd == ['kdqat-int3-g128-seed0', 'kdqat-int3-g128-seed1']
    # the executed notebook holds the injected parameters and the results table
    nb = nbformat.read(out / 'compare.ipynb', as_version=4)
    assert any('injected-parameters' in c.metadata.get('tags', []) for c in nb.cells)
    assert any('KD+QAT' in json.dumps(c.get('outputs', [])) for c in nb.cells if c.cell_type == 'code')
    assert 'KD+QAT' in (out / 'table.md').read_text() and 'plotly' in (out / 'report.html').read_text()
    assert 'shakespeare_choice acc (Δ pts)' in (out / 'table.md').read_text() and m['params']['tasks'] == ['shakespeare_cloze', 'shakespeare_choice']


def test_report_matches_artifacts(study, teacher_dir):
    out, m = study
    tok = load_teacher(m['teacher']['path']).tokenizer
    test = tokenize_split('shakespeare', 'test', tok)
    fp = m['rows'][0]
    assert fp['method'] == 'teacher' and fp['delta_pct'] == 0 and fp['kl'] == 0
    adapted = load_teacher(m['teacher']['path']).model
    assert math.isclose(perplexity(adapted, test, seq_len=32, max_tokens=2048, progress=False).ppl, fp['ppl'], rel_tol=1e-6)
    for r in m['rows']:
        assert math.isclose(r['delta_pct'], 100 * (r['ppl'] / fp['ppl'] - 1), rel_tol=1e-9, abs_tol=1e-9)
        if not r.get('artifact'): continue
        model = load_quantized(out / r['artifact'])
        q = read_quant_config(out / r['artifact'])      # the study's artifact options reach every artifact
        assert q['embedding']['spec'] == m['params']['embedding'] == 'int8' and q['dense']['dtype'] == m['params']['dense_dtype'] == 'bfloat16'
        layers = [mod for mod in model.modules() if type(mod).__name__ == 'PackedLinear']
        assert layers and all(str(l.spec) == r['weights'] for l in layers)
        direct = perplexity(model, test, seq_len=32, max_tokens=2048, progress=False)
        assert math.isclose(direct.ppl, r['ppl'], rel_tol=1e-6) and direct.n_tokens == r['eval_tokens']
        if r['method'] == 'kd+qat':   # the accuracy columns are the harness's on the artifact, for the study's tasks and sizes
            acc = study_columns(evaluate_tasks(model, tok, m['params']['tasks'], n=20, **B.task_shape(32)))
            assert acc == r['tasks'] and {'shakespeare_cloze/acc', 'shakespeare_choice/acc'} <= set(acc)
        size = sum(f.stat().st_size for f in (out / r['artifact']).rglob('*') if f.is_file())
        assert size == r['size_bytes'] and math.isclose(r['compression'], fp['size_bytes'] / size)


def test_training_curves_and_teacher_untouched(study):
    out, m = study
    for r in m['rows']:
        if r['method'] not in ('fp-control', 'qat', 'kd+qat'): continue
        h = [json.loads(l) for l in (out / r['curves']).read_text().splitlines()]
        assert [x['step'] for x in h] == list(range(1, 9))
        assert r['teacher_hash_unchanged'] is True
        if r['method'] == 'kd+qat': assert all(x['distill'] > 0 and x['quant'] >= 0 for x in h)
        assert not list((out / r['curves']).parent.glob('checkpoints/*'))   # checkpoints removed once the artifact exists


def test_summary_mean_and_spread(study):
    out, m = study
    s = {(x['method'], x['weights']): x for x in summary(m['rows'])}
    kd = [r['ppl'] for r in m['rows'] if r['method'] == 'kd+qat']
    assert math.isclose(s[('kd+qat', 'int3-g128')]['ppl'], sum(kd) / 2)
    assert math.isclose(s[('kd+qat', 'int3-g128')]['ppl_sd'], abs(kd[0] - kd[1]) / math.sqrt(2))
    assert s[('kd+qat', 'int3-g128')]['runs'] == 2 and s[('rtn', 'int3-g128')]['runs'] == 1
    assert f"{s[('kd+qat', 'int3-g128')]['ppl']:.3f} ± {s[('kd+qat', 'int3-g128')]['ppl_sd']:.3f}" in markdown_table(m)


def test_resume_refuse_and_overwrite(study, teacher_dir):
    out, m = study
    before = (out / 'metrics.json').read_text()
    assert main(['compare', '--teacher', str(teacher_dir), *ARGS, '--out', str(out)]) == 0     # everything done: nothing redone
    assert json.loads((out / 'metrics.json').read_text())['rows'] == json.loads(before)['rows']
    other = [a if a != '8' else '9' for a in ARGS]
    assert main(['compare', '--teacher', str(teacher_dir), *other, '--out', str(out)]) == 2     # other parameters: refused
    assert (out / 'metrics.json').read_text() != '' and json.loads((out / 'metrics.json').read_text())['params']['steps'] == 8


def test_bad_input_fails_before_any_work(tmp_path, capsys):
    for args, msg in ((['--methods', 'rtn,bogus'], '--methods: unknown method'), (['--weights', 'int8-token'], '--weights: int8-token is an activation format'),
                      (['--eval-tokens', '100'], '--eval-tokens: must be an integer >= 2048'), (['--weights', 'int4-gq'], 'expected one of'),
                      (['--corpus', 'klingon'], '--corpus: unknown corpus'), (['--tau', 'hot'], 'invalid _tau value'),
                      (['--embedding', 'int8-token'], '--embedding: int8-token is an activation format'),
                      (['--embedding', 'int4-gq'], '--embedding: '), (['--dense-dtype', 'float16'], '--dense-dtype: must be one of'),
                      (['--seeds', '0,1,0'], "--seeds: lists ['0'] more than once"), (['--weights', 'int4-g128,int3-g128,int4-g128'], '--weights: lists'),
                      (['--methods', 'rtn,kd+qat,rtn'], "--methods: lists ['rtn']"),
                      (['--weights', 'gguf-q4_0', '--export', 'gguf,gguf'], "--export: lists ['gguf'] more than once"),
                      (['--weights', 'gguf-q4_0', '--init', 'awq'], "--init: 'awq' cannot start the trained rows at ['gguf-q4_0']"),
                      (['--curve-every', '-1'], '--curve-every: must be an integer >= 0'), (['--curve-tokens', '64'], '--curve-tokens: must be an integer >= 256')):
        assert main(['compare', '--teacher', 'embedded', '--out', str(tmp_path / 'x'), *args]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()


def test_interrupted_study_keeps_whole_rows(teacher_dir, tmp_path, monkeypatch):
    "A study stopped in the middle of a trained row reports only whole rows and finishes on the next call."
    cfg = StudyConfig(teacher=str(teacher_dir), corpus='shakespeare', weights=['int3-g128'], methods=['rtn', 'qat', 'kd+qat'],
                      steps=6, batch_size=4, seq_len=32, lr=1e-3, tau=2.0, out=str(tmp_path / 's'), eval_tokens=2048,
                      eval_seq_len=32, adapt_steps=0, latency_runs=1, blockwise=False, calib_samples=4, calib_seq_len=32, eval_corpora=[])
    real = B.trained_row
    def boom(cfg, teacher, r, *a, **k):
        if r['method'] == 'kd+qat': raise KeyboardInterrupt
        return real(cfg, teacher, r, *a, **k)
    monkeypatch.setattr(B, 'trained_row', boom)
    with pytest.raises(KeyboardInterrupt): run_study(cfg, progress=False)
    rows = json.loads((tmp_path / 's' / 'metrics.json').read_text())['rows']
    assert [r['method'] for r in rows] == ['teacher', 'rtn', 'rtn', 'qat'] and all('ppl' in r for r in rows)
    monkeypatch.setattr(B, 'trained_row', real)
    m = run_study(cfg, progress=False)
    assert [r['method'] for r in m['rows']] == ['teacher', 'rtn', 'rtn', 'qat', 'kd+qat']
    assert m['rows'][:4] == rows


def test_overwrite_after_an_interrupted_trained_row_starts_it_over(teacher_dir, tmp_path, monkeypatch):
    "A study stopped inside a trained row, rerun with other parameters and --overwrite: its run (checkpoints) goes too, the row trains afresh."
    import signal
    kw = dict(teacher=str(teacher_dir), corpus='shakespeare', weights=['int3-g128'], methods=['rtn', 'kd+qat'], int8_baseline=False,
              batch_size=4, seq_len=32, lr=1e-3, tau=2.0, out=str(tmp_path / 's'), eval_tokens=2048, eval_seq_len=32,
              adapt_steps=0, latency_runs=1, blockwise=False, calib_samples=4, calib_seq_len=32, eval_corpora=[], tasks=[])
    class Terminated(B.Trainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.callbacks.append(lambda rec: rec['step'] == 3 and os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setattr(B, 'Trainer', Terminated)
    with pytest.raises(RuntimeError, match='stopped at step 3'): run_study(StudyConfig(steps=8, **kw), progress=False)
    monkeypatch.setattr(B, 'Trainer', Terminated.__mro__[1])
    (tmp_path / 's' / 'runs' / 'my-notes.md').write_text('mine')
    m = run_study(StudyConfig(steps=6, **kw), overwrite=True, progress=False)
    assert [r['method'] for r in m['rows']] == ['teacher', 'rtn', 'kd+qat'] and m['params']['steps'] == 6
    curve = (tmp_path / 's' / 'runs' / 'kdqat-int3-g128-seed0' / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(l)['step'] for l in curve] == list(range(1, 7))          # trained from step 1, not resumed from the old run
    assert (tmp_path / 's' / 'runs' / 'my-notes.md').read_text() == 'mine'


def test_unsupported_pairs_are_listed(teacher_dir):
    rows, skipped = B.plan_rows(StudyConfig(weights=['nvfp4'], methods=['gptq', 'awq', 'rtn']).validate())
    assert [(r['method'], r['weights']) for r in rows] == [('teacher', 'fp32'), ('rtn', 'int8'), ('rtn', 'nvfp4')]
    assert len(skipped) == 2 and all('integer formats' in s for s in skipped)


def test_sigterm_in_a_trained_row_records_nothing_and_resumes(teacher_dir, tmp_path, monkeypatch):
    "SIGTERM inside a trained row (a cancelled, preempted or timed-out job): no row is recorded; the next call resumes the row from its checkpoint."
    import signal
    cfg = StudyConfig(teacher=str(teacher_dir), corpus='shakespeare', weights=['int3-g128'], methods=['rtn', 'kd+qat'], int8_baseline=False,
                      steps=20, batch_size=4, seq_len=32, lr=1e-3, tau=2.0, out=str(tmp_path / 's'), eval_tokens=2048, eval_seq_len=32,
                      adapt_steps=0, latency_runs=1, blockwise=False, calib_samples=4, calib_seq_len=32, eval_corpora=[])
    class Terminated(B.Trainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.callbacks.append(lambda rec: rec['step'] == 12 and os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setattr(B, 'Trainer', Terminated)
    with pytest.raises(RuntimeError, match='stopped at step 12 of 20'): run_study(cfg, progress=False)
    assert [r['method'] for r in json.loads((tmp_path / 's' / 'metrics.json').read_text())['rows']] == ['teacher', 'rtn']
    curve = tmp_path / 's' / 'runs' / 'kdqat-int3-g128-seed0' / 'metrics.jsonl'
    before = curve.read_text().splitlines()
    assert len(before) == 12
    monkeypatch.setattr(B, 'Trainer', Terminated.__mro__[1])
    m = run_study(cfg, progress=False)
    assert [r['method'] for r in m['rows']] == ['teacher', 'rtn', 'kd+qat']
    after = curve.read_text().splitlines()
    assert len(after) == 20 and after[:12] == before                    # steps 1-12 kept from the checkpoint written on SIGTERM, not retrained


def test_study_tasks_rescores_rows_with_paired_differences(study, tmp_path):
    "benchmarks/study_tasks.py: every packed row and the teacher rescored; its paired differences are per-example means."
    import importlib.util
    spec = importlib.util.spec_from_file_location('study_tasks', Path(__file__).parents[1] / 'benchmarks' / 'study_tasks.py')
    st = importlib.util.module_from_spec(spec); spec.loader.exec_module(st)
    out, m = study
    assert st.main([str(out), '--out', str(tmp_path / 'tasks'), '--n-cloze', '6', '--n-choice', '5', '--threads', '1']) is None
    res = json.loads((tmp_path / 'tasks' / 'results.json').read_text())['rows']
    want = ['teacher'] + [st.row_label(r) for r in m['rows'] if r.get('artifact')]
    assert list(res) == want and len(want) >= 6
    for key, rec in res.items():
        assert {t: len(s) for t, s in rec['samples'].items()} == {'shakespeare_cloze': 6, 'shakespeare_choice': 5}
    # the teacher's accuracy is a direct harness run on the same examples
    direct = evaluate_tasks(load_teacher(m['teacher']['path']), tasks=['shakespeare_cloze', 'shakespeare_choice'],
                            n={'shakespeare_cloze': 6, 'shakespeare_choice': 5}, **B.task_shape(m['eval']['seq_len']))
    assert study_columns(direct) == study_columns(st.as_table(res['teacher']))
    # one paired difference, recomputed from the per-example values
    kd = next(k for k in res if k.startswith('kd+qat'))
    a, b = ({x['doc_id']: x['acc'] for x in res[k]['samples']['shakespeare_choice']} for k in (kd, 'teacher'))
    d = statistics.fmean(a[i] - b[i] for i in a)
    table = (tmp_path / 'tasks' / 'table.md').read_text()
    line = next(l for l in table.splitlines() if l.startswith(f'| {kd} |'))
    assert f"{100 * d:+.1f} ±" in line.split('|')[7]          # Δ teacher, shakespeare_choice acc
    # a second run resumes: nothing to rescore, same table
    assert st.main([str(out), '--out', str(tmp_path / 'tasks'), '--n-cloze', '6', '--n-choice', '5']) is None
    assert (tmp_path / 'tasks' / 'table.md').read_text() == table


def test_cached_states_serve_only_the_study_that_made_them(tmp_path):
    "A PTQ/start state left by an overwritten study with other parameters is computed again, not reused (issue 12)."
    from kdq_bench.benchmarks import StudyConfig, _save_state, _load_state
    m = torch.nn.Linear(4, 4)
    a = StudyConfig(teacher='embedded', calib_samples=4).study_params()
    _save_state(m, tmp_path/'s', dict(seconds=1.0, study=a), 'ptq-student')
    assert _load_state(tmp_path/'s', torch.nn.Linear(4, 4), a) is not None
    assert _load_state(tmp_path/'s', torch.nn.Linear(4, 4), StudyConfig(teacher='embedded', calib_samples=16).study_params()) is None
