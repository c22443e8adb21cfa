"""The study's `export` option (`--export gguf,compressed-tensors`): every exported row is read back by the other
ecosystems' own readers -- the `gguf` package (`gguf.quants`) and transformers + compressed-tensors -- and compared
with the row's saved artifact, bit for bit; sizes, table columns, resume, and the refusals before any work."""
import json, math

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

from kdq_bench.benchmarks import StudyConfig, StudyError, run_study, markdown_table
from kdq_bench.cli import main
from kdq_bench.deploy import gguf_state_dict
from kdq_bench.export import load_quantized, PackedLinear
from kdq_bench.files import MARKER
from kdq_bench.sweeps import coerce_param
from kdq_bench.testing import random_tokens

STUDY = dict(corpus='shakespeare', weights=['gguf-q4_0'], init='gptq', methods=['rtn', 'kd+qat'], export=['gguf', 'compressed-tensors'],
             embedding='int8', steps=4, batch_size=2, seq_len=32, lr=1e-3, scale_lr=1e-3, tau=2.0, eval_tokens=2048, eval_seq_len=32,
             calib_samples=4, calib_seq_len=32, blockwise_samples=2, blockwise_seq_len=32, adapt_steps=0, latency_runs=1,
             eval_corpora=[], tasks=[], threads=1)


@pytest.fixture(scope="module")
def study(tiny_teacher, tmp_path_factory):
    "A tiny study (seconds): int8 baseline, RTN and KD+QAT in gguf-q4_0, exported to GGUF and compressed-tensors."
    out = tmp_path_factory.mktemp("export-study") / "run"
    m = run_study(StudyConfig(teacher=str(tiny_teacher.path), out=str(out), **STUDY), progress=False)
    return out, m


def _files_bytes(p):
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob('*') if f.is_file() and f.name != MARKER)


def _artifact_state(model):
    "What the artifact computes with, float32: dequantized packed weights and every other tensor."
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    with torch.no_grad():
        sd = {k: v.float() for k, v in model.state_dict().items() if not any(k.startswith(n + '.') for n in layers)}
        sd |= {n + '.weight': m.dequantized_weight() for n, m in layers.items()}
    return sd


def test_exported_rows_files_and_sizes(study):
    out, m = study
    got = {(r['method'], r['weights']): sorted(r['exports']) if 'exports' in r else None for r in m['rows']}
    assert got == {('teacher', 'fp32'): None, ('rtn', 'int8'): None,     # the int8 baseline is not one of the study's formats
                   ('rtn', 'gguf-q4_0'): ['compressed-tensors', 'gguf'], ('kd+qat', 'gguf-q4_0'): ['compressed-tensors', 'gguf']}
    for r in m['rows']:
        for t, e in (r.get('exports') or {}).items():
            p = out / e['path']
            assert p.parent == out / 'export' / r['artifact'] and p.exists()
            assert e['size_bytes'] == _files_bytes(p) > 0
    assert (out / 'export' / 'kdqat-gguf-q4_0-seed0' / 'model.gguf').is_file()
    assert (out / 'export' / 'kdqat-gguf-q4_0-seed0' / 'compressed-tensors' / 'config.json').is_file()
    assert not [p for p in (out / 'export').iterdir() if p.name.startswith('.')]     # no temporary folders left


@pytest.mark.parametrize("method", ['rtn', 'kd+qat'])
def test_gguf_reads_back_the_artifact_bit_for_bit(study, method):
    "The gguf package's reader gives back exactly the tensors the row's artifact computes with (packed linears dequantized)."
    out, m = study
    r = next(r for r in m['rows'] if r['method'] == method and r['weights'] == 'gguf-q4_0')
    f = out / r['exports']['gguf']['path']
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(f)).tensors}
    assert types['blk.0.attn_q.weight'] == GT.Q4_0 and types['blk.0.ffn_down.weight'] == GT.Q4_0
    assert types['output_norm.weight'] == GT.F32     # the int8 embedding's dequantized values are not bfloat16 numbers: F32
    assert types['token_embd.weight'] == (GT.BF16 if m['params']['embedding'] is None else GT.F32)
    ref = _artifact_state(load_quantized(out / r['artifact'], backend='dequant'))
    ref.pop('lm_head.weight')                          # tied: llama.cpp reuses token_embd
    back = gguf_state_dict(f)
    assert sorted(back) == sorted(ref)
    assert [k for k in ref if not torch.equal(back[k], ref[k])] == []


@pytest.mark.parametrize("method", ['rtn', 'kd+qat'])
def test_compressed_tensors_logits_equal_the_artifact(study, tiny_teacher, method):
    "transformers + compressed-tensors load the checkpoint and compute the artifact's logits, bit for bit."
    out, m = study
    r = next(r for r in m['rows'] if r['method'] == method and r['weights'] == 'gguf-q4_0')
    p = out / r['exports']['compressed-tensors']['path']
    qc = json.loads((p / 'config.json').read_text())['quantization_config']
    w = qc['config_groups']['group_0']['weights']
    assert (qc['format'], w['num_bits'], w['group_size'], w['symmetric']) == ('pack-quantized', 4, 32, True)
    back = AutoModelForCausalLM.from_pretrained(str(p), quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32)
    art = load_quantized(out / r['artifact'], backend='dequant')
    x = torch.from_numpy(random_tokens(64, len(tiny_teacher.tokenizer), seed=1)).long().view(2, 32)
    with torch.no_grad(): assert torch.equal(back(x).logits, art(x).logits)
    text = 'To be, or not to be: that is the question.'
    assert AutoTokenizer.from_pretrained(str(p))(text)['input_ids'] == tiny_teacher.tokenizer(text)['input_ids']


def test_table_shows_export_sizes_only_when_exported(study):
    out, m = study
    table = markdown_table(m)
    head = table.splitlines()[0]
    assert '| size | GGUF | c-t | compression |' in head
    kd = next(r for r in m['rows'] if r['method'] == 'kd+qat')
    line = next(l for l in table.splitlines() if l.startswith('| KD+QAT |'))
    assert f"| {kd['exports']['gguf']['size_bytes'] / 1e6:.2f} MB | {kd['exports']['compressed-tensors']['size_bytes'] / 1e6:.2f} MB |" in line
    assert '| – | – |' in next(l for l in table.splitlines() if l.startswith('| PTQ RTN | int8 |'))
    assert (out / 'table.md').read_text() == table
    plain = {**m, 'params': {k: v for k, v in m['params'].items() if k != 'export'},
             'rows': [{k: v for k, v in r.items() if k != 'exports'} for r in m['rows']]}
    assert 'GGUF' not in markdown_table(plain) and 'c-t' not in markdown_table(plain)


def test_resume_does_not_redo_exports(study, tiny_teacher):
    out, m = study
    stamps = {p: p.stat().st_mtime_ns for p in (out / 'export').rglob('*') if p.is_file()}
    again = run_study(StudyConfig(teacher=str(tiny_teacher.path), out=str(out), **STUDY), progress=False)
    assert again['rows'] == m['rows']
    assert {p: p.stat().st_mtime_ns for p in (out / 'export').rglob('*') if p.is_file()} == stamps


def test_export_option_parsing():
    "Comma-separated strings (the CLI, a sweep file's scalar) become the list of targets; without exports the parameters are unchanged."
    c = StudyConfig(weights='gguf-q4_0', init='gptq', export=coerce_param('export', 'gguf,compressed-tensors', [])).validate()
    assert c.export == ['gguf', 'compressed-tensors'] and c.study_params()['export'] == ['gguf', 'compressed-tensors']
    assert 'export' not in StudyConfig(weights='gguf-q4_0', init='gptq').validate().study_params()


def test_refused_before_any_work(tmp_path, capsys):
    for args, msg in ((['--weights', 'gguf-q4_0', '--export', 'onnx'], "--export: unknown deploy target(s) ['onnx']"),
                      (['--weights', 'int4-g128', '--export', 'gguf'], '--export: gguf cannot hold the weight format int4-g128'),
                      (['--weights', 'int4-g128', '--export', 'gguf'], 'gguf-q4_0, gguf-q8_0, mxfp4'),
                      (['--weights', 'nf4-g64', '--export', 'compressed-tensors'], 'W4A16')):
        assert main(['compare', '--teacher', 'embedded', '--out', str(tmp_path / 'x'), *args]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()


def test_teacher_the_exporters_refuse_stops_before_training(tiny_teacher, tmp_path):
    "Groups of 128 do not divide the tiny teacher's 32 inputs: compressed-tensors refuses, right after the teacher loads."
    out = tmp_path / 'y'
    cfg = StudyConfig(teacher=str(tiny_teacher.path), out=str(out), **{**STUDY, 'weights': ['int4-g128'], 'export': ['compressed-tensors'],
                                                                       'adapt_steps': 20})
    with pytest.raises(StudyError, match='divide the 32 inputs') as e: run_study(cfg, progress=False)
    assert e.value.field == 'export'
    assert not (out / 'metrics.json').exists() and not list(out.glob('ptq')) and not list(out.glob('runs'))
