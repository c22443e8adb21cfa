"""End to end through the `kdq-bench` console script on a tiny teacher (seconds)."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from kdq_bench.models import load_teacher
from kdq_bench.export import load_quantized
from kdq_bench.data import tokenize_split
from kdq_bench.evaluate import perplexity
from kdq_bench.cli import main


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    "The tiny teacher's folder, the form `--teacher PATH` takes."
    return tiny_teacher.path


def test_console_script_formats():
    out = subprocess.run(['kdq-bench', 'formats', '--weights', 'int8,int4-g128'], capture_output=True, text=True, check=True).stdout
    assert '| int4-g128 | 4.25 |' in out and '| int8 |' in out


def test_console_script_rejects_bad_input():
    r = subprocess.run(['kdq-bench', 'ptq', '--weights', 'int4-g', '--teacher', 'embedded'], capture_output=True, text=True)
    assert r.returncode == 2 and 'expected one of' in r.stderr


def test_ptq_study_end_to_end_matches_artifacts(teacher_dir, tmp_path):
    "`kdq-bench ptq` is the study with PTQ rows only: its rows are those of the saved artifacts, evaluated directly."
    out = tmp_path / 'run'
    args = ['ptq', '--teacher', str(teacher_dir), '--corpus', 'shakespeare', '--methods', 'rtn', '--weights', 'int8,int2-g16-asym',
            '--out', str(out), '--eval-tokens', '2048', '--eval-seq-len', '32', '--eval-corpora', '', '--latency-runs', '1']
    assert main(args) == 0
    m = json.loads((out / 'metrics.json').read_text())
    rows = {(r['method'], r['weights']): r for r in m['rows']}
    assert set(rows) == {('teacher', 'fp32'), ('rtn', 'int8'), ('rtn', 'int2-g16-asym')}
    assert '| PTQ RTN | int8 |' in (out / 'table.md').read_text()
    tok = load_teacher(str(teacher_dir)).tokenizer
    test = tokenize_split('shakespeare', 'test', tok)
    for w in ('int8', 'int2-g16-asym'):
        r = rows[('rtn', w)]
        model = load_quantized(out / r['artifact'])
        direct = perplexity(model, test, seq_len=32, max_tokens=2048, progress=False)
        assert abs(direct.ppl - r['ppl']) < 1e-6 * direct.ppl
        fp = rows[('teacher', 'fp32')]['ppl']
        assert abs(r['delta_pct'] - 100 * (r['ppl'] / fp - 1)) < 1e-9
    assert rows[('rtn', 'int2-g16-asym')]['size_bytes'] < rows[('rtn', 'int8')]['size_bytes'] < rows[('teacher', 'fp32')]['size_bytes']
    # a second run in the same folder resumes (nothing redone); other parameters are refused without --overwrite
    assert main(args) == 0
    assert json.loads((out / 'metrics.json').read_text())['rows'] == m['rows']
    assert main(args + ['--calib-samples', '4']) == 2


def test_ptq_refuses_trained_methods_and_names_the_option(capsys):
    assert main(['ptq', '--teacher', 'embedded', '--methods', 'rtn,kd+qat']) == 2
    assert "--methods: ['kd+qat'] are not PTQ methods" in capsys.readouterr().err
    assert main(['compare', '--teacher', 'embedded', '--calib-seq-len', '0']) == 2
    assert '--calib-seq-len: must be an integer >= 1' in capsys.readouterr().err


def test_options_and_notebook_parameters_are_study_config():
    "Every StudyConfig field is a `compare` option and a parameter of the experiment notebook, with the same default."
    import ast
    from dataclasses import fields
    from kdq_bench.benchmarks import StudyConfig
    from kdq_bench.cli import build_parser, notebook_parameters, study_notebook
    compare = next(a for a in build_parser()._subparsers._group_actions[0].choices['compare']._actions if a.dest == 'teacher').container
    dests = {a.dest for a in compare._actions}
    assert {f.name for f in fields(StudyConfig)} <= dests
    nb = notebook_parameters(study_notebook())
    assert set(nb) == {f.name for f in fields(StudyConfig)} | {'overwrite'}
    for f in fields(StudyConfig): assert ast.literal_eval(nb[f.name]) == getattr(StudyConfig(), f.name), f.name


def test_documented_commands_parse_and_validate(tmp_path):
    "The commands the experiment notebook documents give a valid study: kdq-bench's through its parser, papermill's through the injected cell."
    import shlex, subprocess, nbformat
    from kdq_bench.benchmarks import StudyConfig
    from kdq_bench.cli import build_parser, study_config, study_notebook
    intro = nbformat.read(study_notebook(), as_version=4).cells[0].source
    cmds = [shlex.split(l) for l in intro.splitlines() if l.startswith(('kdq-bench ', 'papermill '))]
    assert [c[0] for c in cmds] == ['kdq-bench', 'papermill']
    cfg = study_config(build_parser().parse_args(cmds[0][1:]))
    assert cfg.weights == ['int3-g128', 'int2-g64'] and cfg.seeds == [0, 1, 2]
    pm = cmds[1]
    pm[1], pm[2] = str(study_notebook()), str(tmp_path / 'x.ipynb')
    subprocess.run(pm + ['--prepare-only'], check=True, capture_output=True, cwd=tmp_path)
    cfg = _notebook_config(tmp_path / 'x.ipynb')
    assert cfg.weights == ['int3-g128'] and cfg.seeds == [0, 1] and cfg.teacher == 'embedded' and cfg.out == 'runs/x'


def _notebook_config(path):
    "Run a prepared study notebook's cells up to the one that builds `cfg` (no kernel: the same code in one namespace)."
    import nbformat
    ns = {}
    for c in nbformat.read(path, as_version=4).cells:
        if c.cell_type != 'code': continue
        exec(c.source.replace('\ncfg\n', '\n').removesuffix('\ncfg'), ns)
        if 'cfg' in ns: return ns['cfg']


def test_papermill_refuses_a_parameter_the_study_does_not_have(tmp_path):
    "papermill injects any `-p name value`; the notebook refuses a name that is not a study parameter before any work."
    import subprocess
    from kdq_bench.benchmarks import StudyError
    from kdq_bench.cli import study_notebook
    for p, ok in ((['-p', 'stpes', '3'], False), (['-p', 'steps', '3', '-p', 'overwrite', 'True'], True)):
        subprocess.run(['papermill', str(study_notebook()), str(tmp_path / 'x.ipynb'), '-p', 'teacher', 'embedded', *p, '--prepare-only'],
                       check=True, capture_output=True, cwd=tmp_path)
        if ok: assert _notebook_config(tmp_path / 'x.ipynb').steps == 3
        else:
            with pytest.raises(StudyError, match=r"stpes: is not a parameter of this study; its parameters are \['teacher'"):
                _notebook_config(tmp_path / 'x.ipynb')


def _refused(capsys, argv, flag):
    "`kdq-bench ARGV` is refused in one line `kdq-bench: error: FLAG: ...` with exit code 2."
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and err.startswith(f"kdq-bench: error: {flag}: "), err
    return err


@pytest.mark.parametrize('bad', ['missing', 'file', 'json', 'truncated'])
def test_bad_inputs_are_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, teacher_dir, bad):
    "Output paths under a file, unparsable numbers, teacher folders that cannot load: refused by every command, one line, code 2."
    import kdq_bench.models as M
    monkeypatch.setattr(M, '_load_dir', lambda *a, **k: pytest.fail('a model was loaded'))       # nothing may load
    f = tmp_path/'afile'; f.write_text('mine')
    t = tmp_path/'teacher'
    if bad == 'file': t = f
    elif bad != 'missing':
        t.mkdir(); [os.symlink(p, t/p.name) for p in Path(teacher_dir).iterdir() if p.name != 'manifest.json']
        if bad == 'json': (t/'config.json').unlink(); (t/'config.json').write_text('{not json')
        else:
            w = (t/'model.safetensors').read_bytes(); (t/'model.safetensors').unlink(); (t/'model.safetensors').write_bytes(w[:len(w)//2])
    _refused(capsys, ['ptq', '--teacher', str(t), '--out', str(tmp_path/'o')], '--teacher')
    _refused(capsys, ['compare', '--teacher', str(t), '--out', str(tmp_path/'o')], '--teacher')
    cfg = tmp_path/'c.yaml'; cfg.write_text(f"training: {{teacher: '{t}', steps: 2, output_dir: '{tmp_path/'r'}'}}")
    with pytest.raises(SystemExit) as e: main(['train', '--config', str(cfg)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and '\n' not in err and err.startswith('kdq-bench: error: --config: training.teacher: '), err
    if bad == 'missing':   # the same for flags argparse refuses and output folders under a file
        _refused(capsys, ['compare', '--lr', 'abc'], '--lr')
        assert main(['ptq', '--teacher', 'embedded', '--out', str(f/'sub')]) == 2
        assert 'is a file, so no folder' in capsys.readouterr().err
    assert f.read_text() == 'mine' and not (tmp_path/'o').exists() and not (tmp_path/'r').exists()


def test_train_config_errors_after_the_checks_are_one_line(tmp_path, capsys, teacher_dir, monkeypatch):
    "A window beyond the context and an activation format as weights: one line, code 2, before the teacher loads."
    import kdq_bench.models as M
    monkeypatch.setattr(M, '_load_dir', lambda *a, **k: pytest.fail('a model was loaded'))
    for extra, msg in (("seq_len: 100000", "training.seq_len of 100000 tokens is longer than the model's context"),
                       ("seq_len: 16}\nblockwise: {enabled: true, seq_len: 5000", "blockwise.seq_len of 5000 tokens"),
                       ("seq_len: 16}\nquantization: {weights: int8-token", 'per token')):
        cfg = tmp_path/'c.yaml'; cfg.write_text(f"training: {{teacher: '{teacher_dir}', steps: 2, batch_size: 2, output_dir: '{tmp_path/'r'}', {extra}}}")
        with pytest.raises(SystemExit) as e: main(['train', '--config', str(cfg), '--no-progress'])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and '\n' not in err and msg in err and err.startswith('kdq-bench: error: --config: '), err
