"""Does KD+QAT beat QAT and RTN at low bit widths? FP teacher, FP control, RTN, QAT-only and KD+QAT students of the embedded teacher.

Usage:
    python benchmarks/kdqat_evidence.py                         # int3-g128 (lr 1e-4) and int2-g64 (lr 3e-4), 300 steps, seed 0
    python benchmarks/kdqat_evidence.py --formats int3-g128 --steps 300 --seeds 0 1 --topk 32 64 --extra-taus 1 --threads 1

Every trained student starts from a copy of the embedded teacher (`load_teacher('embedded')`, trained to a validation
plateau and cached by kdq_bench.models) and sees the same batches (same data seed), the same optimizer and LR schedule
and the same number of steps; only `training.method` (and the format) changes:

- teacher:  the FP teacher itself.
- fp:       the FP control: the same extra steps of plain fine-tuning (no quantization, no teacher) -- what extra
            training alone buys.
- rtn:      round-to-nearest fake quantization of the teacher's weights, no training.
- qat:      quantization-aware training on the ground-truth tokens.
- kd+qat:   joint distillation (forward KL, τ=4) and QAT with the seeds' λ/γ schedule.
- kd+qat/topkK: the same from cached teacher top-K logits.

Perplexity is measured on the first `--eval-tokens` tokens of the validation and of the test split (windows of seq_len,
no overlap); choose hyper-parameters on validation, report test.
Writes a JSON with every number and every training curve (default cache_dir()/experiments/trainer_evidence.json) and
prints a Markdown table.
"""
import argparse, json, math, time
from pathlib import Path
import torch

from kdq_bench.data import cache_dir, tokenize_split
from kdq_bench.models import load_teacher, make_student
from kdq_bench.quantizers import quantize_model
from kdq_bench.evaluate import perplexity
from kdq_bench.trainer import TrainConfig, Trainer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--teacher', default='embedded', help="load_teacher name or folder (default: the embedded teacher)")
    p.add_argument('--corpus', default='shakespeare', help='training and validation text (the teacher\'s corpus)')
    p.add_argument('--formats', nargs='+', default=['int3-g128', 'int2-g64'])
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--seq-len', type=int, default=128)
    p.add_argument('--temperature', type=float, default=4.0)
    p.add_argument('--extra-taus', type=float, nargs='*', default=[], help='also run kd+qat at these temperatures (every format)')
    p.add_argument('--methods', nargs='+', default=['fp', 'rtn', 'qat', 'kd+qat'], help='which runs to make')
    p.add_argument('--lr', type=float, nargs='+', default=[1e-4, 3e-4], help='peak learning rate per format (one value: all formats)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--topk', type=int, nargs='*', default=[], help='also train from cached top-k teacher logits (last format only)')
    p.add_argument('--topk-tau', type=float, default=None, help='temperature of the top-k runs (default --temperature)')
    p.add_argument('--eval-tokens', type=int, default=32768)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', default=None, help='JSON path (default cache_dir()/experiments/trainer_evidence.json)')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if len(a.lr) not in (1, len(a.formats)): raise ValueError(f"give one --lr or one per format ({len(a.formats)})")
    lrs = dict(zip(a.formats, a.lr * len(a.formats) if len(a.lr) == 1 else a.lr))
    out = Path(a.out) if a.out else cache_dir()/'experiments'/'trainer_evidence.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    T = load_teacher(a.teacher, progress=False)
    train = tokenize_split(a.corpus, 'train', T.tokenizer)
    evals = {s: tokenize_split(a.corpus, s, T.tokenizer) for s in ('validation', 'test')}
    def ppl(m): return {s: perplexity(m, v, seq_len=a.seq_len, max_tokens=a.eval_tokens, batch_size=16, progress=False).ppl
                        for s, v in evals.items()}
    res = dict(args=vars(a), teacher=dict(path=str(T.path), info={k: v for k, v in T.info.items() if k != 'history'}),
               runs=[], torch=torch.__version__)
    def save(): out.write_text(json.dumps(res, indent=1))
    def record(**kw):
        res['runs'].append(kw); save()
        print(json.dumps({k: v for k, v in kw.items() if k != 'history'}), flush=True)
    record(method='teacher', format='fp32', seed=None, ppl=ppl(T.model), seconds=0.0)

    def train_run(method, fmt, seed, topk=0, tau=None, lr=None):
        tau = a.temperature if tau is None else tau
        lr = lrs[fmt] if lr is None else lr
        cfg = TrainConfig.from_dict({
            'training': {'method': method, 'steps': a.steps, 'batch_size': a.batch_size, 'seq_len': a.seq_len, 'seed': seed},
            'quantization': {'weights': fmt or 'int4-g128'},
            'distillation': {'cache_topk': topk, 'temperature': tau},
            'optimizer': {'lr': lr}})
        t0 = time.time()
        r = Trainer(cfg, teacher=T, train_tokens=train, progress=False).fit()
        secs = time.time() - t0
        hist = [{k: h[k] for k in ('step', 'phase', 'lr', 'lam', 'gam', 'loss', 'task', 'distill', 'quant', 'ratio',
                                   'quant_enabled', 'grad_norm', 'tokens_per_s')} for h in r.history]
        name = method + (f'/top{topk}' if topk else '') + (f'/tau{tau:g}' if tau != a.temperature else '')
        record(method=name, format=fmt or 'fp32', seed=seed, lr=lr, tau=tau if method.startswith('kd') else None, ppl=ppl(r.student), seconds=secs,
               soft_targets=r.soft_targets, teacher_hash=r.teacher_hash, history=hist)

    if 'fp' in a.methods:
        for lr in sorted(set(lrs.values())):
            for seed in a.seeds: train_run('fp', None, seed, lr=lr)
    for fmt in a.formats:
        if 'rtn' in a.methods: record(method='rtn', format=fmt, seed=None, ppl=ppl(quantize_model(make_student(T), fmt)), seconds=0.0)
        for seed in a.seeds:
            if 'qat' in a.methods: train_run('qat', fmt, seed)
            if 'kd+qat' in a.methods: train_run('kd+qat', fmt, seed)
            for tau in a.extra_taus: train_run('kd+qat', fmt, seed, tau=tau)
    for k in a.topk:      # first seed only: compared with the live-teacher run of the same seed and temperature
        train_run('kd+qat', a.formats[-1], a.seeds[0], topk=k, tau=a.topk_tau)
    t_ppl = res['runs'][0]['ppl']
    print(f"\n| method | format | lr | seed | test ppl | vs FP teacher | val ppl | vs FP teacher | train time |\n|---|---|---|---|---|---|---|---|---|")
    for r in res['runs']:
        print(f"| {r['method']} | {r['format']} | {r.get('lr', '')} | {'' if r['seed'] is None else r['seed']} | {r['ppl']['test']:.2f} | "
              f"{100 * (r['ppl']['test'] / t_ppl['test'] - 1):+.1f}% | {r['ppl']['validation']:.2f} | "
              f"{100 * (r['ppl']['validation'] / t_ppl['validation'] - 1):+.1f}% | {r['seconds']:.0f} s |")
    print(f"\nwritten to {out}")
    return res


if __name__ == '__main__':
    main()
