"""FSDP2 on CPU: `torchrun --nproc_per_node 2` (gloo) against one process with the same global batch.

Both runs go through the module entry point `python -m kdq_bench.trainer --config cfg.yaml`, on a tiny Llama teacher
saved with its tokenizer and a small generated text corpus."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from kdq_bench.models import train_tokenizer
from kdq_bench.trainer import TrainConfig, list_checkpoints

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there been one all we their has would when if so no will can more out up into do any time").split()

def corpus(n_words=24000, seed=0):
    "Paragraphs of pseudo-English with a little structure (word bigrams from a seeded Markov chain)."
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, len(WORDS), (len(WORDS), 3))
    w, out, para = 0, [], []
    for i in range(n_words):
        w = nxt[w, rng.integers(0, 3)] if rng.random() < 0.9 else rng.integers(0, len(WORDS))
        para.append(WORDS[w])
        if len(para) >= 60: out.append(' '.join(para) + '.'); para = []
    return '\n\n'.join(out)

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('dist')
    text = corpus()
    (root/'corpus.txt').write_text(text)
    tok = train_tokenizer([text], vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id))
    model.save_pretrained(root/'teacher'); tok.save_pretrained(root/'teacher')
    cfg = {'training': {'method': 'kd+qat', 'teacher': str(root/'teacher'), 'corpus': str(root/'corpus.txt'), 'steps': 6,
                        'batch_size': 4, 'grad_accum': 1, 'seq_len': 32, 'checkpoint_every': 3},
           'quantization': {'weights': 'int4-g16'},
           'distillation': {'check_soft_targets': 'off', 'adaptive_every': 2, 'ratio_threshold': 0.0},
           'optimizer': {'lr': 1e-3}}
    (root/'cfg.yaml').write_text(yaml.safe_dump(cfg))
    TrainConfig.from_yaml(root/'cfg.yaml')   # valid
    return root

def run(cmd, root, timeout=600):
    env = dict(os.environ, KDQ_BENCH_CACHE=str(root/'cache'), OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p

def torchrun(): return [sys.executable, '-m', 'torch.distributed.run']

def rows(out): return [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()]

@pytest.fixture(scope='module')
def runs(setup):
    "The same run in one process and in two FSDP processes; returns the root and the 2-process stdout."
    root = setup
    # one process, the global batch of 4 in two micro-batches of 2
    run([sys.executable, '-m', 'kdq_bench.trainer', '--config', 'cfg.yaml', '--threads', '1', '--no-progress',
               '--output-dir', str(root/'one'), '--set', 'training.grad_accum=2'], root)
    # two processes (FSDP2 over gloo), 2 windows each
    two = run(torchrun() + ['--standalone', '--nproc_per_node', '2', '-m', 'kdq_bench.trainer', '--config', 'cfg.yaml',
                            '--no-progress', '--output-dir', str(root/'two')], root)
    return root, two.stdout

def test_fsdp_two_processes_equal_one_process(runs):
    root, out = runs
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary['status'] == 'completed' and summary['step'] == 6
    a, b = rows(root/'one'), rows(root/'two')
    assert [r['step'] for r in a] == [r['step'] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        for k in ('loss', 'task', 'distill', 'quant', 'grad_norm', 'lr', 'lam', 'gam'):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (x['step'], k, x[k], y[k])   # KL ~1e-4: float32 noise ~1e-7
    assert any(r['lam'] < 0.5 for r in a if r['phase'] == 'joint')          # the adaptive rule fired, identically
    wa = load_file(str(list_checkpoints(root/'one')[-1]/'student.safetensors'))
    wb = load_file(str(list_checkpoints(root/'two')[-1]/'student.safetensors'))
    assert sorted(wa) == sorted(wb)
    for k in wa: torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    st = json.loads((list_checkpoints(root/'two')[-1]/'trainer_state.json').read_text())
    assert st['world_size'] == 2 and st['step'] == 6

def test_distributed_checkpoint_resumes_in_one_process(runs):
    "A checkpoint written by 2 FSDP processes holds full tensors: one process resumes it and matches the 2-process run."
    root, _ = runs
    part = root/'part'
    shutil.copytree(root/'two', part)
    ck = list_checkpoints(part)
    shutil.rmtree(ck[-1])                                                   # keep step 3, drop step 6
    assert list_checkpoints(part)[-1].name == 'step-00000003'
    run([sys.executable, '-m', 'kdq_bench.trainer', '--config', 'cfg.yaml', '--threads', '1', '--no-progress',
         '--output-dir', str(part), '--resume'], root)
    a, b = rows(root/'two'), rows(part)
    for x, y in zip(a, b): assert x['loss'] == pytest.approx(y['loss'], rel=1e-5)
    wa = load_file(str(list_checkpoints(root/'two')[-1]/'student.safetensors'))
    wb = load_file(str(list_checkpoints(part)[-1]/'student.safetensors'))
    for k in wa: torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
