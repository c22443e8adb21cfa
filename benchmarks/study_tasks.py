"""Downstream accuracy of a finished study's rows, at sizes that can rank them, with paired differences.

A study scores its offline tasks on `task_examples` examples per task (50 by default, to keep the main job short):
enough to report accuracy, too few to rank methods a few points apart (standard error about 7 points). This script
rescores every packed row of a finished study, and its teacher, on more examples of the same tasks (the harness,
through `kdq_bench.downstream.evaluate_tasks`, with the study's passage shape) and adds the paired differences
(`paired_difference`: the same examples scored by both models, so the shared difficulty cancels):
each row against the FP teacher, and each other row against GPTQ (or another PTQ row, `--versus`) at the same weight
format.

Usage:
    python benchmarks/study_tasks.py STUDY_DIR --out DIR                       # 300 cloze / 200 choice examples per task
    python benchmarks/study_tasks.py STUDY_DIR --out DIR --n-cloze 100 --n-choice 100 --versus gptq

Writes DIR/results.json (per row: the table and per-example values, so an interrupted run resumes row by row) and
DIR/table.md. Artifacts load with the exact dequantizing backend, as the study scores them.
"""
import argparse, json, math, sys
from pathlib import Path

import pandas as pd
import torch

from kdq_bench.benchmarks import task_shape
from kdq_bench.downstream import default_tasks, evaluate_tasks, paired_difference
from kdq_bench.export import load_quantized, dequantize_linears
from kdq_bench.files import atomic_write_json, atomic_write_text, claim_folder, record
from kdq_bench.models import load_teacher


def study_tasks(metrics:dict) -> list[str]:
    "The offline tasks the study scored ('auto', or none at all: its corpus's cloze and choice)."
    t = metrics['params'].get('tasks')
    return default_tasks(metrics['params']['corpus']) if t in ('auto', None) or not t else list(t)


def sizes(tasks, n_cloze, n_choice) -> dict:
    return {t: n_cloze if t.endswith('_cloze') else n_choice for t in tasks}


def score(model, tokenizer, tasks, n, shape) -> dict:
    "The harness's table and per-example values of one model, as JSON-ready records."
    tab = evaluate_tasks(model, tokenizer, tasks, n=n, samples=True, **shape)
    return dict(table=tab.to_dict('records'), samples={t: s.to_dict('records') for t, s in tab.attrs['samples'].items()})


def as_table(rec:dict) -> pd.DataFrame:
    tab = pd.DataFrame(rec['table'])
    tab.attrs['samples'] = {t: pd.DataFrame(s) for t, s in rec['samples'].items()}
    return tab


def row_label(r:dict) -> str: return r['method'] if r['method'] == 'teacher' else f"{r['method']} {r['weights']}" + (f" s{r['seed']}" if r.get('seed') is not None else '')


def markdown(results:dict, rows:list, versus:str) -> str:
    "One line per row: accuracy ± s.e. per task and metric, paired difference vs the teacher and vs `versus` (points)."
    tabs = {k: as_table(v) for k, v in results.items()}
    ref = tabs['teacher']
    metrics = [(t, m) for t, m in ref[['task', 'metric']].itertuples(index=False) if m in ('acc', 'acc_norm')]
    head = ['row', 'test ppl'] + [f"{t} {m}" for t, m in metrics] + [f"Δ teacher {t} {m}" for t, m in metrics] + [f"Δ {versus} {t} {m}" for t, m in metrics]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        key = row_label(r)
        if key not in tabs: continue
        tab = tabs[key].set_index(['task', 'metric'])
        cells = [key, f"{r['ppl']:.3f}"] + [f"{100 * tab.loc[(t, m), 'value']:.1f} ± {100 * tab.loc[(t, m), 'stderr']:.1f}" for t, m in metrics]
        def diffs(other):
            if other is None or other == key: return ['—'] * len(metrics)
            d = paired_difference(tabs[key], tabs[other]).set_index(['task', 'metric'])
            return [f"{100 * d.loc[(t, m), 'difference']:+.1f} ± {100 * d.loc[(t, m), 'stderr']:.1f}" for t, m in metrics]
        base = next((row_label(x) for x in rows if x['method'] == versus and x['weights'] == r['weights']), None)
        cells += diffs('teacher' if key != 'teacher' else None) + diffs(base if r['method'] not in ('teacher', versus) else None)
        lines.append('| ' + ' | '.join(cells) + ' |')
    n = {t: len(s) for t, s in results['teacher']['samples'].items()}
    return '\n'.join(lines) + f"\n\nExamples per task: {n}. Accuracy in %, ± the harness's standard error; Δ: paired difference in points ± its standard error.\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('study', type=Path, help='a finished study folder (holding metrics.json)')
    ap.add_argument('--out', type=Path, required=True, help='output folder (new, or one this script wrote)')
    ap.add_argument('--n-cloze', type=int, default=300, help='examples per cloze task')
    ap.add_argument('--n-choice', type=int, default=200, help='examples per multiple-choice task')
    ap.add_argument('--versus', default='gptq', help='the row every other row is also paired with (same weights)')
    ap.add_argument('--threads', type=int, default=None, help='torch threads')
    a = ap.parse_args(argv)
    f = a.study / 'metrics.json'
    if not f.is_file(): ap.error(f"{a.study} holds no metrics.json; expected a study folder written by `kdq-bench compare`")
    if min(a.n_cloze, a.n_choice) < 2: ap.error("--n-cloze and --n-choice must be >= 2")
    if a.threads: torch.set_num_threads(a.threads)
    m = json.loads(f.read_text())
    tasks = study_tasks(m)
    n, shape = sizes(tasks, a.n_cloze, a.n_choice), task_shape(m['eval']['seq_len'])
    rows = [r for r in m['rows'] if r['method'] == 'teacher' or r.get('artifact')]
    out = claim_folder(a.out, 'study-tasks')
    res_f = out / 'results.json'
    results = json.loads(res_f.read_text())['rows'] if res_f.exists() else {}
    settings = dict(study=str(a.study.resolve()), tasks=tasks, n=n, shape=shape)
    teacher = load_teacher(m['teacher']['path'] or m['params']['teacher'], progress=False)
    for r in rows:
        key = row_label(r)
        if key in results: continue
        print(f"scoring {key} on {n}", flush=True)
        model = teacher.model if r['method'] == 'teacher' else dequantize_linears(load_quantized(a.study / r['artifact'], backend='dequant'))
        results[key] = score(model, teacher.tokenizer, tasks, n, shape)
        atomic_write_json(res_f, dict(settings=settings, rows=results)); record(out, res_f)
    table = markdown(results, rows, a.versus)
    atomic_write_text(out / 'table.md', table); record(out, out / 'table.md')
    print(table)


if __name__ == '__main__':
    sys.exit(main())
