"""End to end through the `kdq-bench` console script on a tiny teacher (seconds)."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from kdq_bench.models import TeacherRecipe, embedded_teacher
from kdq_bench.export import load_quantized
from kdq_bench.evaluate import evaluate_split
from kdq_bench.cli import main

TINY = TeacherRecipe(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, seq_len=32,
                     batch_size=4, lr=3e-3, warmup_steps=5, max_steps=40, eval_every=10, eval_tokens=1024, patience=2)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    "A tiny embedded-recipe teacher saved as a plain folder, the form `--teacher PATH` takes."
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("KDQ_BENCH_CACHE")
    os.environ["KDQ_BENCH_CACHE"] = str(cache)
    t = embedded_teacher(TINY, progress=False)
    yield t.path
    if old is None: os.environ.pop("KDQ_BENCH_CACHE", None)
    else: os.environ["KDQ_BENCH_CACHE"] = old


def test_console_script_formats():
    out = subprocess.run(['kdq-bench', 'formats', '--weights', 'int8,int4-g128'], capture_output=True, text=True, check=True).stdout
    assert '| int4-g128 | 4.25 |' in out and '| int8 |' in out


def test_console_script_rejects_bad_input():
    r = subprocess.run(['kdq-bench', 'ptq', '--weights', 'int4-g', '--teacher', 'embedded'], capture_output=True, text=True)
    assert r.returncode == 2 and 'expected one of' in r.stderr


def test_ptq_study_end_to_end_matches_artifacts(teacher_dir, tmp_path):
    out = tmp_path / 'run'
    args = ['ptq', '--teacher', str(teacher_dir), '--corpus', 'shakespeare', '--methods', 'rtn',
            '--weights', 'int8,int2-g16-asym', '--out', str(out), '--eval-chars', '3000', '--seq-len', '32']
    assert main(args) == 0
    m = json.loads((out / 'metrics.json').read_text())
    rows = {(r['method'], r['weights']): r for r in m['rows']}
    assert set(rows) == {('fp', 'fp32'), ('rtn', 'int8'), ('rtn', 'int2-g16-asym')}
    assert '| rtn | int8 |' in (out / 'table.md').read_text()
    # the reported numbers are those of the saved packed artifacts, evaluated directly
    from kdq_bench.models import load_teacher
    tok = load_teacher(str(teacher_dir)).tokenizer
    for w in ('int8', 'int2-g16-asym'):
        model = load_quantized(out / f'rtn-{w}')
        r = evaluate_split(model, tok, 'shakespeare', 'test', seq_len=32, max_chars=3000, progress=False)
        assert abs(r.ppl - rows[('rtn', w)]['ppl']) < 1e-3 * r.ppl
        fp = rows[('fp', 'fp32')]['ppl']
        assert abs(rows[('rtn', w)]['delta_pct'] - 100 * (rows[('rtn', w)]['ppl'] / fp - 1)) < 0.01
    assert rows[('rtn', 'int2-g16-asym')]['size_bytes'] < rows[('rtn', 'int8')]['size_bytes'] < rows[('fp', 'fp32')]['size_bytes']
    # a second run in the same folder resumes (nothing redone); other parameters are refused without --overwrite
    assert main(args) == 0
    assert json.loads((out / 'metrics.json').read_text())['rows'] == m['rows']
    assert main(args[:-3] + ['4000', '--seq-len', '32']) == 2
