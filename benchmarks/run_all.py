"""The dashboard: every speed and size ratio of kdq_bench, measured side by side in one process, medians of repeated runs.

Usage:
    python benchmarks/run_all.py --out DIR                  # a few minutes on 2 CPU cores
    python benchmarks/run_all.py --out DIR --repeats 15     # tighter medians
    python benchmarks/run_all.py --out DIR --smollm2        # adds the train-step ratio on SmolLM2-135M (loads it; minutes more)

Writes DIR/results.json (every figure, the settings, the machine and its load) and DIR/table.md, and prints each figure
as it is measured. Sections:

1. fake quantization of a 4096x4096 fp32 weight per format, forward and forward + STE backward, as a fraction of copy
   speed (forward: `w.clone()`; backward: `w.clone()` plus a gradient-sized clone), timed round-robin so load from other
   processes hits every method alike: kdq_bench's default path (`fake_quant(w, fmt)`, compiled after its warm-up calls),
   its eager path with --eager, and torchao's int4 group-128 fake quantizer (eager and torch.compile'd) when torchao imports;
2. step time of KD+QAT (live FP32 teacher, live bf16-autocast teacher, cached top-k teacher) over QAT-only on the
   embedded teacher (`benchmarks/bench_train_step.py`, interleaved rounds);
3. artifact bytes on disk (every file of the folder) of the embedded teacher quantized by RTN to int8 / int4-g128 /
   int3-g128 / nf4-g64, with dense tensors in fp32, in bf16, and bf16 with the embedding packed as int8 or int4-g32,
   against its FP32 and BF16 safetensors, with the perplexity of each loaded artifact on 4096 Shakespeare test tokens;
   and the same bytes for SmolLM2-135M's tensor shapes (computed by packing random tensors of its shapes; no model is
   loaded; tensor bytes only, without the safetensors headers and JSON files);
4. decode time of the packed int4-g128 and int8 artifacts (torch's CPU int4/int8 kernels, bf16 compute) over the FP32
   teacher (`kdq_bench.benchmarks.decode_ratio`, timed in alternation).
"""
import argparse, copy, json, os, platform, statistics, sys, tempfile, time, warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fake_quant import torchao_int4_g128   # noqa: E402  (this folder's own benchmark)
import bench_train_step                          # noqa: E402

from kdq_bench.quantizers import COMPILE_AFTER, fake_quant, quantize, quantize_model
from kdq_bench.export import save_quantized, load_quantized, pack_qtensor, tensors_nbytes
from kdq_bench.evaluate import perplexity, model_size_bytes
from kdq_bench.data import tokenize_split
from kdq_bench.models import load_teacher
from kdq_bench.benchmarks import decode_ratio

FQ_FORMATS = ['int4-g128', 'int8', 'nf4-g64', 'mxfp4', 'nvfp4', 'gguf-q4_0']
SIZE_FORMATS = ['int8', 'int4-g128', 'int3-g128', 'nf4-g64']
VARIANTS = {'dense fp32': dict(dense_dtype=None), 'dense bf16': dict(), 'bf16 + emb int8': dict(embedding='int8'),
            'bf16 + emb int4-g32': dict(embedding='int4-g32')}
# SmolLM2-135M-Instruct (docs: DESIGN.md): 30 blocks, hidden 576, MLP 1536, 9 heads / 3 KV heads of 64, vocab 49,152, tied
SMOL = dict(layers=30, hidden=576, inter=1536, kv=192, vocab=49152)


def load() -> float: return round(os.getloadavg()[0], 2)


def say(*a): print(*a, flush=True)


def round_robin(fns:dict, repeats:int, warmup:int) -> dict:
    "Median seconds of each callable, timed in turns (warm-up calls first, untimed)."
    for _ in range(warmup):
        for f in fns.values(): f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def fake_quant_speed(size:int, repeats:int, eager:bool=False) -> dict:
    "Forward and forward+backward speed of each path as a fraction of copy speed (higher is better; 1 = copy speed)."
    torch.manual_seed(0)
    w = torch.randn(size, size)
    wg, g = w.clone().requires_grad_(True), torch.ones_like(w)
    def train(f):
        def run():
            wg.grad = None
            f(wg).backward(g)
        return run
    paths = {f'{fmt} default': (lambda x, fmt=fmt: fake_quant(x, fmt)) for fmt in FQ_FORMATS}
    if eager: paths |= {f'{fmt} eager': (lambda x, fmt=fmt: fake_quant(x, fmt, compiled=False)) for fmt in FQ_FORMATS}
    ao = torchao_int4_g128()
    if ao is not None:
        paths['torchao int4-g128 eager'] = ao
        paths['torchao int4-g128 compiled'] = torch.compile(ao)
    first = {}
    for k, f in paths.items():   # warm-up outside the timing: the default path compiles after COMPILE_AFTER calls (forward and grad kernels)
        t0 = time.perf_counter()
        for _ in range(COMPILE_AFTER + 1): f(w); train(f)()
        first[k] = time.perf_counter() - t0
    fwd = round_robin({'copy': lambda: w.clone(), **{k: (lambda f=f: f(w)) for k, f in paths.items()}}, repeats, 1)
    bwd = round_robin({'copy': lambda: (w.clone(), g.clone()), **{k: train(f) for k, f in paths.items()}}, repeats, 1)
    out = {}
    for k in paths:
        out[k] = dict(fwd_vs_copy=fwd['copy'] / fwd[k], fwd_bwd_vs_copy=bwd['copy'] / bwd[k], fwd_ms=1e3 * fwd[k],
                      fwd_bwd_ms=1e3 * bwd[k], warmup_s=first[k])
        say(f"  {k:28s} fwd {out[k]['fwd_vs_copy']:.2f} x copy   fwd+bwd {out[k]['fwd_bwd_vs_copy']:.2f} x copy   (warm-up {first[k]:.1f} s)")
    if ao is not None: out['torchao_max_abs_diff_int4_g128'] = (ao(w) - fake_quant(w, 'int4-g128')).abs().max().item()
    out['copy'] = dict(fwd_ms=1e3 * fwd['copy'], fwd_bwd_ms=1e3 * bwd['copy'], GBps=2 * 4 * w.numel() / fwd['copy'] / 1e9)
    return out


def train_steps(teacher:str, repeats:int, threads:int, out:Path) -> dict:
    "KD+QAT variants over QAT-only (bench_train_step.py's interleaved rounds)."
    # warm-up steps past COMPILE_AFTER: each trainer's fake quantization is compiled before its timed rounds
    res = bench_train_step.main(['--teacher', teacher, '--rounds', str(repeats), '--steps-per-round', '2', '--warmup-steps', str(COMPILE_AFTER + 1),
                                 '--threads', str(threads), '--json', str(out)])
    return {k: dict(ratio=v['ratio'], median_ms=1e3 * v['median_s']) for k, v in res.items() if k != 'parts'} | {'parts_ms': {k: 1e3 * v for k, v in res['parts'].items()}}


def artifact_sizes(t, test_tokens, work:Path) -> dict:
    "Bytes, compression and perplexity of each RTN artifact variant of the embedded teacher."
    fp32 = model_size_bytes(t.model)
    bf16 = model_size_bytes(copy.deepcopy(t.model).to(torch.bfloat16))
    ppl = lambda m: perplexity(m, test_tokens, seq_len=128, max_tokens=4096, batch_size=8, progress=False).ppl
    res = {'fp32_bytes': fp32, 'bf16_bytes': bf16, 'teacher_ppl': ppl(t.model), 'rows': []}
    say(f"  FP32 teacher {fp32:,} bytes, BF16 {bf16:,} bytes, ppl {res['teacher_ppl']:.3f}")
    for fmt in SIZE_FORMATS:
        student = quantize_model(copy.deepcopy(t.model), fmt)
        for name, kw in VARIANTS.items():
            d = save_quantized(student, work / f'{fmt}-{name.replace(" ", "_")}', **kw)
            size = model_size_bytes(d)
            p = ppl(load_quantized(d, backend='dequant'))
            res['rows'].append(dict(weights=fmt, variant=name, bytes=size, vs_fp32=fp32 / size, vs_bf16=bf16 / size, ppl=p,
                                    delta_pct=100 * (p / res['teacher_ppl'] - 1), path=str(d)))
            say(f"  {fmt:10s} {name:20s} {size:>10,} bytes  {fp32 / size:5.2f}x vs FP32  {bf16 / size:5.2f}x vs BF16  ppl {p:.3f} ({100 * (p / res['teacher_ppl'] - 1):+.2f}%)")
    return res


def smollm2_shape_sizes() -> dict:
    "Tensor bytes of SmolLM2-135M's packed artifacts, from random tensors of its shapes (pack_qtensor's own byte counts)."
    s = SMOL
    lin = {(s['hidden'], s['hidden']): 2, (s['kv'], s['hidden']): 2, (s['inter'], s['hidden']): 2, (s['hidden'], s['inter']): 1}
    n_lin = s['layers'] * sum(o * i * k for (o, i), k in lin.items())
    n_emb, n_norm = s['vocab'] * s['hidden'], (2 * s['layers'] + 1) * s['hidden']
    g = torch.Generator().manual_seed(0)
    packed = lambda shape, fmt: tensors_nbytes(pack_qtensor(quantize(torch.randn(*shape, generator=g), fmt)))
    emb_bytes = {'bf16': 2 * n_emb, 'int8': packed((s['vocab'], s['hidden']), 'int8'), 'int4-g32': packed((s['vocab'], s['hidden']), 'int4-g32')}
    res = {'params': n_lin + n_emb + n_norm, 'fp32_bytes': 4 * (n_lin + n_emb + n_norm), 'bf16_bytes': 2 * (n_lin + n_emb + n_norm), 'rows': []}
    for fmt in SIZE_FORMATS:
        lin_bytes = s['layers'] * sum(packed(shape, fmt) * k for shape, k in lin.items())
        for emb, eb in emb_bytes.items():
            total = lin_bytes + eb + 2 * n_norm
            res['rows'].append(dict(weights=fmt, variant='dense bf16' if emb == 'bf16' else f'bf16 + emb {emb}', bytes=total,
                                    vs_fp32=res['fp32_bytes'] / total, vs_bf16=res['bf16_bytes'] / total,
                                    linear_bits_per_weight=8 * lin_bytes / n_lin))
            say(f"  smollm2 {fmt:10s} {res['rows'][-1]['variant']:20s} {total:>12,} bytes  {res['fp32_bytes'] / total:5.2f}x vs FP32  {res['bf16_bytes'] / total:5.2f}x vs BF16")
    return res


def decode(t, sizes:dict, runs:int) -> dict:
    "Packed decode time over the FP32 teacher's (the study's fast path: torch's kernels with bf16 compute)."
    res = {}
    for fmt in ('int4-g128', 'int8'):
        path = next(r['path'] for r in sizes['rows'] if r['weights'] == fmt and r['variant'] == 'dense bf16')
        m = load_quantized(path, compute_dtype=torch.bfloat16)
        ms, ref = decode_ratio(m, t.model, runs)
        res[fmt] = dict(decode_ms=ms, fp32_decode_ms=ref, ratio=ms / ref, backends=sorted({x.backend for x in m.modules() if hasattr(x, 'backend')}))
        say(f"  {fmt:10s} packed {ms:.1f} ms, FP32 {ref:.1f} ms: {ms / ref:.2f} x  ({'/'.join(res[fmt]['backends'])})")
    return res


def table(r:dict) -> str:
    L = [f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs, torch {r['machine']['torch']}, {r['machine']['threads']} threads; "
         f"load average {r['load']['start']} at the start, {r['load']['end']} at the end; {r['seconds']:.0f} s "
         f"({', '.join(f'{k} {v:.0f} s' for k, v in r['section_seconds'].items())}); medians of {r['repeats']} runs.", '']
    fq = r['fake_quant']
    L += [f"**Fake quantization, {r['size']}×{r['size']} fp32, fraction of copy speed** (1.00 = as fast as `w.clone()`; "
          "forward+backward against `w.clone()` plus a gradient-sized clone; higher is better)", '',
          '| path | fwd | fwd+bwd |', '|---|---|---|']
    L += [f"| {k} | {v['fwd_vs_copy']:.2f} | {v['fwd_bwd_vs_copy']:.2f} |" for k, v in fq.items() if isinstance(v, dict) and 'fwd_vs_copy' in v]
    for name, ts in r['train_step'].items():
        L += ['', f'**Train step time over QAT-only, {name}**', '', '| method | ms/step | × QAT |', '|---|---|---|']
        L += [f"| {k} | {v['median_ms']:.0f} | {v['ratio']:.2f} |" for k, v in ts.items() if k != 'parts_ms']
    a = r['artifacts']
    L += ['', f"**Artifacts of the embedded teacher (RTN)**: FP32 {a['fp32_bytes']:,} bytes, BF16 {a['bf16_bytes']:,} bytes, "
          f"perplexity {a['teacher_ppl']:.3f} on 4096 Shakespeare test tokens", '',
          '| weights | dense tensors | bytes | × vs FP32 | × vs BF16 | ppl | Δ ppl |', '|---|---|---|---|---|---|---|']
    L += [f"| {x['weights']} | {x['variant']} | {x['bytes']:,} | {x['vs_fp32']:.2f} | {x['vs_bf16']:.2f} | {x['ppl']:.3f} | {x['delta_pct']:+.2f}% |" for x in a['rows']]
    s = r['smollm2_shapes']
    L += ['', f"**SmolLM2-135M's shapes** ({s['params'] / 1e6:.1f}M weights; tensor bytes, computed): FP32 {s['fp32_bytes']:,}, BF16 {s['bf16_bytes']:,}", '',
          '| weights | dense tensors | bytes | × vs FP32 | × vs BF16 | linear bits/weight |', '|---|---|---|---|---|---|']
    L += [f"| {x['weights']} | {x['variant']} | {x['bytes']:,} | {x['vs_fp32']:.2f} | {x['vs_bf16']:.2f} | {x['linear_bits_per_weight']:.3f} |" for x in s['rows']]
    L += ['', '**Decode (prefill 64 + 16 new tokens), packed artifact over the FP32 embedded teacher**', '',
          '| weights | packed ms | FP32 ms | × FP32 | kernels |', '|---|---|---|---|---|']
    L += [f"| {k} | {v['decode_ms']:.1f} | {v['fp32_decode_ms']:.1f} | {v['ratio']:.2f} | {'/'.join(v['backends'])} |" for k, v in r['decode'].items()]
    return '\n'.join(L) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', required=True, help='output folder (results.json, table.md, the train-step JSON)')
    p.add_argument('--repeats', type=int, default=5, help='timed runs (rounds) of each measurement; the median is reported')
    p.add_argument('--size', type=int, default=4096, help='side of the fake-quantized weight')
    p.add_argument('--threads', type=int, default=1, help="torch intra-op threads (1: steady timings on a shared machine, where "
                   "multi-threaded steps stall whenever another process takes a core)")
    p.add_argument('--eager', action='store_true', help="also time fake_quant's eager path (slow for the codebook formats)")
    p.add_argument('--smollm2', action='store_true', help='also time the train step on SmolLM2-135M (loads the model)')
    a = p.parse_args(argv)
    if a.repeats < 1: p.error('--repeats must be >= 1')
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings('ignore')
    t_start = time.time()
    r = dict(repeats=a.repeats, size=a.size, load={'start': load()},
             machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__, threads=a.threads))
    say(f"kdq_bench dashboard: torch {torch.__version__}, {a.threads} threads, {os.cpu_count()} CPUs, load average {r['load']['start']}")
    say(f"[1/4] fake quantization, {a.size}x{a.size} fp32 (load {load()})")
    r['fake_quant'] = fake_quant_speed(a.size, a.repeats, a.eager)
    r['section_seconds'] = {'fake_quant': time.time() - t_start}
    say(f"[2/4] train step, KD+QAT over QAT-only (load {load()})")
    r['train_step'] = {'embedded teacher': train_steps('embedded', a.repeats, a.threads, out / 'train_step_embedded.json')}
    if a.smollm2: r['train_step']['SmolLM2-135M'] = train_steps('smollm2-135m', a.repeats, a.threads, out / 'train_step_smollm2.json')
    r['section_seconds']['train_step'] = time.time() - t_start - sum(r['section_seconds'].values())
    say(f"[3/4] artifact bytes and perplexity (load {load()})")
    t = load_teacher('embedded', progress=False)
    test_tokens = tokenize_split('shakespeare', 'test', t.tokenizer)
    with tempfile.TemporaryDirectory(prefix='kdq_bench_artifacts_') as work:   # artifacts: measured, then removed
        r['artifacts'] = artifact_sizes(t, test_tokens, Path(work))
        r['smollm2_shapes'] = smollm2_shape_sizes()
        r['section_seconds']['artifacts'] = time.time() - t_start - sum(r['section_seconds'].values())
        say(f"[4/4] decode, packed over FP32 (load {load()})")
        r['decode'] = decode(t, r['artifacts'], a.repeats)
        r['section_seconds']['decode'] = time.time() - t_start - sum(r['section_seconds'].values())
    for row in r['artifacts']['rows']: row.pop('path')
    r['load']['end'], r['seconds'] = load(), time.time() - t_start
    (out / 'results.json').write_text(json.dumps(r, indent=1))
    (out / 'table.md').write_text(table(r))
    say(f"\nwrote {out / 'results.json'} and {out / 'table.md'} in {r['seconds']:.0f} s (load average {r['load']['end']})")
    return r


if __name__ == '__main__':
    main()
