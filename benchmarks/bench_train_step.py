"""Step time of QAT-only, KD+QAT with a live teacher, and KD+QAT with cached teacher top-k logits, side by side.

Usage:
    python benchmarks/bench_train_step.py                      # the embedded teacher's architecture, random weights
    python benchmarks/bench_train_step.py --teacher embedded   # the trained embedded teacher (cached by kdq_bench.models)
    python benchmarks/bench_train_step.py --threads 1 --rounds 7 --steps-per-round 5 --json out.json

The three trainers are built on the same teacher, data and config (batch x seq_len tokens per step, fake quantization on
from step 0, the joint phase's λ and γ) and timed in interleaved rounds -- QAT, live, cached, QAT, live, cached, ... --
so that load from other processes hits all three alike. Each round times `steps_per_round` consecutive optimizer steps
(`Trainer.train_step`: data, teacher or cache, student forward, losses, backward, clipping, AdamW). The cache is filled
before timing (`Trainer._prepare`), as a second run with the same teacher and data finds it. Reported: the median
per-step time of each method over the rounds and its ratio to QAT-only (targets: live <= 1.35x, cached <= 1.10x), and
the teacher's forward pass and the distillation loss timed alone. A fourth variant runs the live teacher under bf16
autocast (`distillation.teacher_precision: bf16`) while the student stays fp32.
"""
import argparse, json, os, statistics, sys, tempfile, time
import numpy as np
import torch

from kdq_bench.models import DEFAULT_RECIPE, load_teacher
from kdq_bench.data import windows
from kdq_bench.trainer import TrainConfig, Trainer
from kdq_bench.losses import distill_loss, TopKLogits
from transformers import LlamaForCausalLM


class _Tok:  # the recipe's config needs the special-token ids only
    bos_token_id, eos_token_id, pad_token_id = 0, 0, 1
    def __len__(self): return DEFAULT_RECIPE.vocab_size


def teacher_model(name: str):
    if name == 'embedded-shape':
        torch.manual_seed(0)
        return LlamaForCausalLM(DEFAULT_RECIPE.config(_Tok())).eval(), None
    t = load_teacher(name)
    return t.model, t.tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--teacher', default='embedded-shape', help="'embedded-shape' (random weights), 'embedded', 'smollm2-135m' or a folder")
    p.add_argument('--weights', default='int4-g128', help='weight format of the student')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--seq-len', type=int, default=128)
    p.add_argument('--topk', type=int, default=64, help='k of the cached teacher logits')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--steps-per-round', type=int, default=4)
    p.add_argument('--warmup-steps', type=int, default=2)
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'])
    p.add_argument('--json', help='write the results here')
    p.add_argument('--no-bf16-teacher', action='store_true', help='skip the bf16-teacher variant')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = teacher_model(a.teacher)
    vocab = model.get_output_embeddings().weight.shape[0]
    steps = a.warmup_steps + a.rounds * a.steps_per_round
    tokens = np.random.default_rng(0).integers(0, vocab, (steps + 1) * a.batch_size * a.seq_len).astype(np.int32)
    base = {'training': {'steps': steps, 'batch_size': a.batch_size, 'seq_len': a.seq_len, 'precision': a.precision},
            'quantization': {'weights': a.weights, 'fake_quant_start': 0},
            'distillation': {'warmup_frac': 0.0, 'final_frac': 0.0, 'adaptive': False, 'check_soft_targets': 'off'},
            'optimizer': {'lr': 1e-5, 'warmup_frac': 0.0}}
    methods = {'qat': {'training': {'method': 'qat'}},
               'kd+qat live': {'training': {'method': 'kd+qat'}},
               'kd+qat live, bf16 teacher': {'training': {'method': 'kd+qat'}, 'distillation': {'teacher_precision': 'bf16'}},
               f'kd+qat cached k={a.topk}': {'training': {'method': 'kd+qat'}, 'distillation': {'cache_topk': a.topk}}}
    if a.no_bf16_teacher: methods.pop('kd+qat live, bf16 teacher')
    old_cache = os.environ.get('KDQ_BENCH_CACHE')
    os.environ['KDQ_BENCH_CACHE'] = tempfile.mkdtemp(prefix='kdq_bench_step_')   # a fresh cache: filled below, not timed
    trainers = {}
    for name, over in methods.items():
        d = {s: dict(base.get(s, {}), **over.get(s, {})) for s in set(base) | set(over)}
        tr = Trainer(TrainConfig.from_dict(d), teacher=(model, tok), train_tokens=tokens, progress=False)
        t0 = time.perf_counter(); tr._prepare(0); prep = time.perf_counter() - t0
        if tr.cache is not None: print(f'{name}: cache filled for {steps} steps in {prep:.1f} s (not timed)', file=sys.stderr)
        trainers[name] = tr
    if old_cache is None: del os.environ['KDQ_BENCH_CACHE']
    else: os.environ['KDQ_BENCH_CACHE'] = old_cache
    for tr in trainers.values():
        for s in range(a.warmup_steps): tr.train_step(s)
    times = {n: [] for n in trainers}
    for r in range(a.rounds):
        for n, tr in trainers.items():
            s0 = a.warmup_steps + r * a.steps_per_round
            t0 = time.perf_counter()
            for s in range(s0, s0 + a.steps_per_round): tr.train_step(s)
            times[n].append((time.perf_counter() - t0) / a.steps_per_round)
    ref = statistics.median(times['qat'])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"teacher {a.teacher} ({n_params/1e6:.2f}M params, vocab {vocab}), student {a.weights}, batch {a.batch_size}x{a.seq_len}, "
          f"{a.precision}, {a.threads} threads, {a.rounds} rounds x {a.steps_per_round} steps, torch {torch.__version__}")
    print(f"{'method':26s} {'median ms/step':>15s} {'min':>8s} {'max':>8s} {'tokens/s':>9s} {'x QAT':>6s}")
    res = {}
    for n, ts in times.items():
        med = statistics.median(ts)
        res[n] = dict(median_s=med, min_s=min(ts), max_s=max(ts), ratio=med / ref, tokens_per_s=a.batch_size * a.seq_len / med, rounds=ts)
        print(f"{n:26s} {med*1e3:15.1f} {min(ts)*1e3:8.1f} {max(ts)*1e3:8.1f} {a.batch_size*a.seq_len/med:9.0f} {med/ref:6.2f}")
    # where the extra time goes: the teacher's forward pass and the distillation loss (forward + backward), timed alone
    live = trainers['kd+qat live']
    x = windows(tokens, np.arange(a.batch_size), a.seq_len)
    with torch.no_grad(): z_t = model(x).logits
    z_s = z_t.detach() + torch.randn_like(z_t)
    tk = TopKLogits.from_logits(z_t, a.topk)
    def t_teacher():
        with torch.no_grad(): model(x)
    def t_teacher_bf16():
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16): model(x)
    def t_kl(t):
        def f():
            s = z_s.clone().requires_grad_()
            distill_loss(s, t, tau=4.0).backward()
        return f
    def med(f, n=a.rounds):
        f(); ts = []
        for _ in range(n): t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    parts = {'teacher forward': med(t_teacher), 'teacher forward, bf16 autocast': med(t_teacher_bf16), 'distill loss fwd+bwd, full vocab': med(t_kl(z_t)),
             f'distill loss fwd+bwd, top-{a.topk}': med(t_kl(tk))}
    print(f"\nparts, timed alone (median of {a.rounds}):")
    for n, v in parts.items(): print(f"  {n:36s} {v*1e3:8.1f} ms  ({v/ref:.2f} x the QAT step)")
    for n in res: res[n]['parts'] = None
    res['parts'] = {n: v for n, v in parts.items()}
    if a.json:
        with open(a.json, 'w') as f: json.dump(dict(args=vars(a), results=res), f, indent=1)
    return res


if __name__ == '__main__':
    main()
