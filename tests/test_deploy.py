"""Tests of kdq_bench.deploy: GGUF and compressed-tensors exports read back by those ecosystems' own readers.

Independent readers: the `gguf` package (`GGUFReader`, `gguf.quants.dequantize`: ggml's reference code ported to
numpy), transformers' GGUF loader (its own Q/K reordering and tokenizer conversion), and transformers +
compressed-tensors (`CompressedTensorsConfig(dequantize=True)`). llama.cpp itself runs in the slow tests and in
benchmarks/bench_deploy.py. Students come from kdq_bench's own formats and quantizers: round to nearest
(`quantize_model`), learned scales (`set_quantizer_mode(..., 'learned')`, trained a few steps) and GPTQ.
"""
import copy, json, os

import gguf
import numpy as np
import pytest
import torch
import torch.nn as nn
from gguf import GGMLQuantizationType as GT
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

from kdq_bench.deploy import (ggml_type, pack_ggml, rope_permutation, tokenizer_metadata, export_gguf, gguf_state_dict,
                              ct_args, ct_compress, export_compressed_tensors, check_deployable, GGUF_EXACT)
from kdq_bench.quantizers import (QTensor, quantize, dequantize, fake_quant, quantize_model, fake_quant_layers,
                                  set_quantizer_mode)
from kdq_bench.ptq import gptq
from kdq_bench.testing import tiny_llama, random_tokens

TEXT = "To be, or not to be: that is the question. Whether 'tis nobler 1599 in the mind to suffer\n\nthe slings"


def _student(model, fmt, **kw):
    "A fake-quantized copy of `model` in `fmt` (round to nearest, or `mode=`)."
    return quantize_model(copy.deepcopy(model), fmt, **kw)


def _learned(model, fmt, steps=3, seed=0):
    "A learned-scale (LSQ) student trained a few steps on the LM loss: weights and scales move off round to nearest."
    s = set_quantizer_mode(_student(model, fmt), 'learned')
    opt = torch.optim.Adam(s.parameters(), lr=2e-3)
    x = torch.from_numpy(random_tokens(128, model.config.vocab_size, seed=seed)).long().view(4, 32)
    for _ in range(steps):
        loss = s(x, labels=x).loss; opt.zero_grad(); loss.backward(); opt.step()
    return s


def _gptq(model, fmt, masters='grid'):
    "A GPTQ'd student (calibrated on random tokens): frozen grids whose codes round to nearest would not choose."
    calib = torch.from_numpy(random_tokens(8 * 32, model.config.vocab_size, seed=5)).long().view(8, 32)
    return gptq(copy.deepcopy(model), calib, weights=fmt, progress=False, masters=masters)


def _off_rtn(student):
    "Layers whose fake-quantized weight is not round to nearest of their master weight."
    with torch.no_grad():
        return [n for n, m in fake_quant_layers(student).items() if not torch.equal(m.quantized_weight(), fake_quant(m.weight, m.w_spec))]


def _fake_quant_state(student):
    "What the student computes with: fake-quantized weights for its quantized linears, the rest as stored."
    with torch.no_grad():
        sd = {k: v for k, v in student.state_dict().items() if 'weight_quantizer' not in k}
        sd |= {n + '.weight': m.quantized_weight().detach() for n, m in fake_quant_layers(student).items()}
    return sd


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return tiny_teacher


# ------------------------------------------------------------------ GGUF: formats and blocks
def test_ggml_type_names_what_gguf_holds():
    assert [ggml_type(f) for f in ('gguf-q4_0', 'gguf-q8_0', 'mxfp4')] == [GT.Q4_0, GT.Q8_0, GT.MXFP4]
    for f in ('int4-g32', 'int4-g128', 'int8', 'nf4-g64', 'nvfp4', 'fp8-e4m3'):
        with pytest.raises(ValueError, match='gguf-q4_0, gguf-q8_0, mxfp4'): ggml_type(f)
    assert list(GGUF_EXACT) == ['gguf-q4_0', 'gguf-q8_0', 'mxfp4']


@pytest.mark.parametrize("ggml", ['q4_0', 'q8_0'])
def test_pack_ggml_reproduces_ggml_reference_bytes(ggml):
    "kdq_bench's round to nearest in gguf-q4_0/q8_0, packed by kdq_bench, is ggml's reference quantizer byte for byte."
    w = torch.randn(24, 96) * 0.05
    w[0, :32] = 0                      # an all-zero block (d = 0)
    w[1, 5] = -1.0                     # a block whose largest magnitude is negative
    blocks, t = pack_ggml(quantize(w, f'gguf-{ggml}'))
    ref = gguf.quants.quantize(w.numpy(), {'q4_0': GT.Q4_0, 'q8_0': GT.Q8_0}[ggml])
    assert t.name == ggml.upper() and blocks.dtype == np.uint8
    np.testing.assert_array_equal(blocks, ref)


def test_pack_ggml_mxfp4_is_read_back_by_ggml():
    w = torch.randn(16, 128) * 0.02
    w[3, :32] = 0
    w[4, 32:64] *= 1e-30               # tiny scales near E8M0's bottom
    qt = quantize(w, 'mxfp4')
    blocks, t = pack_ggml(qt)
    assert t == GT.MXFP4 and blocks.shape == (16, 4 * 17)
    np.testing.assert_array_equal(gguf.quants.dequantize(blocks, t), dequantize(qt).numpy())


def test_pack_ggml_refuses_what_the_blocks_cannot_hold():
    qt = quantize(torch.randn(4, 64), 'gguf-q4_0')
    with pytest.raises(ValueError, match='fp16'): pack_ggml(QTensor(qt.spec, qt.shape, qt.codes, qt.scale * (1 + 2**-20)))
    with pytest.raises(ValueError, match=r'\[-8, 7\]'): pack_ggml(QTensor(qt.spec, qt.shape, qt.codes.clamp(min=0) + 8, qt.scale))
    with pytest.raises(ValueError, match='32 inputs'): pack_ggml(quantize(torch.randn(4, 48), 'mxfp4'))


def test_rope_permutation_matches_llama_cpp_converter():
    "convert_hf_to_gguf.py's LlamaModel.permute, written out: per head, the two halves interleave."
    perm = rope_permutation(12, 2)
    assert perm.tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]
    w = torch.randn(12, 5)
    ref = w.reshape(2, 2, 3, 5).swapaxes(1, 2).reshape(12, 5)
    assert torch.equal(w[perm], ref)
    with pytest.raises(ValueError, match='heads'): rope_permutation(10, 3)


# ------------------------------------------------------------------ GGUF: the whole file
def _fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items()}


@pytest.mark.parametrize("fmt", ['gguf-q4_0', 'gguf-q8_0', 'mxfp4'])
def test_export_gguf_read_back_by_gguf_and_transformers(teacher, fmt, tmp_path):
    model, tok = teacher.model, teacher.tokenizer
    student = _student(model, fmt)
    f = export_gguf(student, tmp_path / 'student.gguf', tok)
    r, meta = _fields(f)
    cfg = model.config
    assert meta['general.architecture'] == 'llama'
    assert (meta['llama.block_count'], meta['llama.embedding_length'], meta['llama.feed_forward_length'],
            meta['llama.attention.head_count'], meta['llama.attention.head_count_kv'], meta['llama.context_length'],
            meta['llama.vocab_size'], meta['llama.rope.dimension_count']) == \
           (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.max_position_embeddings, len(tok), cfg.hidden_size // cfg.num_attention_heads)
    assert meta['llama.rope.freq_base'] == cfg.rope_parameters['rope_theta']
    assert meta['llama.attention.layer_norm_rms_epsilon'] == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    # tokenizer: the vocabulary in id order, the merges of tokenizer.json, special ids
    vocab = tok.get_vocab()
    assert meta['tokenizer.ggml.model'] == 'gpt2' and meta['tokenizer.ggml.pre'] == 'gpt-2'
    assert meta['tokenizer.ggml.tokens'] == sorted(vocab, key=vocab.get)
    merges = json.loads(tok.backend_tokenizer.to_str())['model']['merges']
    assert meta['tokenizer.ggml.merges'] == [' '.join(m) if isinstance(m, list) else m for m in merges]
    assert meta['tokenizer.ggml.eos_token_id'] == tok.eos_token_id and meta['tokenizer.ggml.padding_token_id'] == tok.pad_token_id
    assert meta['tokenizer.ggml.token_type'][tok.eos_token_id] == gguf.TokenType.CONTROL
    # every linear in the ggml type its format names, read back bit for bit
    types = {t.name: t.tensor_type for t in r.tensors}
    want = {'gguf-q4_0': GT.Q4_0, 'gguf-q8_0': GT.Q8_0, 'mxfp4': GT.MXFP4}[fmt]
    assert types['blk.0.attn_q.weight'] == types['blk.0.ffn_down.weight'] == want
    assert types['token_embd.weight'] == types['output_norm.weight'] == GT.F32 and 'output.weight' not in types   # tied
    sd, ref = gguf_state_dict(f), _fake_quant_state(student)
    ref.pop('lm_head.weight')
    assert sorted(sd) == sorted(ref)
    assert [k for k in sd if not torch.equal(sd[k], ref[k])] == []
    # transformers' own GGUF reader: same logits bit for bit, same tokenization
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f.name, dtype=torch.float32)
    x = torch.from_numpy(random_tokens(48, len(tok), seed=1)).long().view(2, 24)
    with torch.no_grad(): assert torch.equal(back(x).logits, student(x).logits)
    tok_back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=f.name)
    assert tok_back(TEXT)['input_ids'] == tok(TEXT)['input_ids']


@pytest.mark.parametrize("fmt", ['gguf-q4_0', 'gguf-q8_0'])
def test_export_gguf_bytes_are_ggml_reference_quantization(teacher, fmt, tmp_path):
    """A round-to-nearest student's file holds, for every linear, exactly the bytes ggml's reference quantizer
    (`gguf.quants.quantize`) writes for that weight in GGUF's row order (Q/K rows permuted as llama.cpp's converter does)."""
    tok = teacher.tokenizer
    model = tiny_llama(vocab=len(tok), hidden=64, layers=2, heads=4, kv_heads=2, tie=False)
    student = _student(model, fmt, ignore=())
    f = export_gguf(student, tmp_path / 's.gguf', tok)
    raw = {t.name: (t.tensor_type, np.array(t.data)) for t in gguf.GGUFReader(str(f)).tensors}
    heads = {'q_proj': 4, 'k_proj': 2}
    for n, m in fake_quant_layers(student).items():
        w = m.weight.detach()
        if (p := n.rpartition('.')[2]) in heads: w = w[rope_permutation(w.shape[0], heads[p])]
        t, data = raw[_gguf_name(n) + '.weight']
        assert t == ggml_type(fmt), n
        np.testing.assert_array_equal(data, gguf.quants.quantize(w.numpy(), t), err_msg=n)


def _gguf_name(hf):
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 64).get_name(hf)


@pytest.mark.parametrize("kind", ['learned', 'gptq', 'gptq-unrounded'])
def test_export_trained_gguf_q4_0_students_read_back_exactly(teacher, kind, tmp_path):
    """Learned-scale and GPTQ'd gguf-q4_0 students (grids round to nearest would not give) export to GGUF and to
    compressed-tensors; ggml's dequantization, transformers' GGUF loader and compressed-tensors all read back exactly
    `layer.quantized_weight()` and the student's logits."""
    model, tok = teacher.model, teacher.tokenizer
    student = _learned(model, 'gguf-q4_0') if kind == 'learned' else _gptq(model, 'gguf-q4_0', 'unrounded' if kind.endswith('unrounded') else 'grid')
    layers = fake_quant_layers(student)
    if kind == 'learned': assert _off_rtn(student) == list(layers)
    else:   # GPTQ moved codes away from round to nearest of the original weights
        orig = dict(model.named_modules())
        with torch.no_grad(): assert any(not torch.equal(m.quantized_weight(), fake_quant(orig[n].weight, 'gguf-q4_0')) for n, m in layers.items())
    f = export_gguf(student, tmp_path / f'{kind}.gguf', tok)
    sd, ref = gguf_state_dict(f), _fake_quant_state(student)
    assert [n for n in layers if not torch.equal(sd[n + '.weight'], ref[n + '.weight'])] == []
    x = torch.from_numpy(random_tokens(48, len(tok), seed=6)).long().view(2, 24)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f.name, dtype=torch.float32)
    with torch.no_grad(): assert torch.equal(back(x).logits, student(x).logits)
    ct = _load_ct(export_compressed_tensors(student, tmp_path / f'{kind}-ct'))
    with torch.no_grad():
        assert [n for n, m in layers.items() if not torch.equal(ct.get_submodule(n).weight, m.quantized_weight())] == []
        assert torch.equal(ct(x).logits, student(x).logits)


def test_export_gguf_grouped_query_attention_and_quantized_head(teacher, tmp_path):
    "Q and K reorder with different head counts; an untied quantized head is written as output.weight."
    tok = teacher.tokenizer
    model = tiny_llama(vocab=len(tok), hidden=64, layers=2, heads=4, kv_heads=2, tie=False)
    student = _student(model, 'gguf-q4_0', ignore=())
    f = export_gguf(student, tmp_path / 'gqa.gguf', tok, dense='f16')
    r, meta = _fields(f)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types['output.weight'] == GT.Q4_0 and types['token_embd.weight'] == GT.F16 and types['blk.1.ffn_norm.weight'] == GT.F32
    assert meta['general.file_type'] == gguf.LlamaFileType.MOSTLY_Q4_0
    sd, ref = gguf_state_dict(f), _fake_quant_state(student)
    for n in fake_quant_layers(student): assert torch.equal(sd[n + '.weight'], ref[n + '.weight']), n
    assert torch.equal(sd['model.embed_tokens.weight'], ref['model.embed_tokens.weight'].half().float())
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f.name, dtype=torch.float32)
    x = torch.from_numpy(random_tokens(40, len(tok), seed=2)).long().view(2, 20)
    with torch.no_grad():
        ref_model = copy.deepcopy(student)
        ref_model.model.embed_tokens.weight.data = ref_model.model.embed_tokens.weight.data.half().float()
        assert torch.equal(back(x).logits, ref_model(x).logits)


def test_export_gguf_copies_a_tokenizer_from_gguf(tmp_path):
    "SmolLM2's tokenizer, copied field for field from the GGUF file it shipped in."
    from kdq_bench.models import smollm2_gguf_path
    src = smollm2_gguf_path()
    orig = tokenizer_metadata(src)                     # every tokenizer.* field of the file
    assert orig['tokenizer.ggml.pre'] == 'smollm' and len(orig['tokenizer.ggml.tokens']) == 49152
    assert orig['tokenizer.ggml.tokens'][:3] == ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
    assert len(orig['tokenizer.ggml.merges']) == 48900 and 'tokenizer.chat_template' in orig
    student = _student(tiny_llama(vocab=49152, hidden=32, layers=1, heads=2), 'mxfp4')
    f = export_gguf(student, tmp_path / 's.gguf', orig)
    _, got = _fields(f)
    assert {k: v for k, v in got.items() if k.startswith('tokenizer.')} == orig


def test_export_gguf_refuses_before_writing(teacher, tmp_path):
    model, tok = teacher.model, teacher.tokenizer
    f = tmp_path / 'no.gguf'
    with pytest.raises(ValueError, match='gguf-q4_0'): export_gguf(_student(model, 'int4-g128'), f, tok)
    with pytest.raises(ValueError, match='inputs'): export_gguf(_student(model, 'mxfp4', acts='int8-token'), f, tok)
    with pytest.raises(ValueError, match='vocabulary'):
        export_gguf(_student(tiny_llama(vocab=97, hidden=32, layers=1, heads=2), 'mxfp4'), f, tok)
    with pytest.raises(ValueError, match='multiple of 32'):
        export_gguf(_student(tiny_llama(vocab=len(tok), hidden=48, layers=1, heads=2), 'mxfp4'), f, tok)
    with pytest.raises(ValueError, match='Llama'): export_gguf(nn.Sequential(nn.Linear(32, 32)), f, tok)
    with pytest.raises(ValueError, match='dense'): export_gguf(_student(model, 'mxfp4'), f, tok, dense='fp8')
    assert not f.exists()


def test_export_gguf_failing_midway_keeps_the_previous_file(teacher, tmp_path):
    "The file is replaced atomically: an export that fails while writing leaves the earlier file as it was, and no temporary."
    model, tok = teacher.model, teacher.tokenizer
    f = export_gguf(_student(model, 'gguf-q8_0'), tmp_path / 's.gguf', tok)
    before = f.read_bytes()
    bad = _student(model, 'gguf-q4_0')
    with torch.no_grad(): fake_quant_layers(bad)['model.layers.0.mlp.down_proj'].weight[0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN'): export_gguf(bad, f, tok)
    assert f.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ['s.gguf']


@pytest.mark.parametrize("fmt", ['gguf-q4_0', 'gguf-q8_0', 'mxfp4', 'int4-g32', 'int4-g32-asym', 'int8', 'int4-g128', 'nf4-g64', 'int3-g32'])
@pytest.mark.parametrize("target", ['gguf', 'compressed-tensors'])
def test_check_deployable_agrees_with_the_exporters(teacher, fmt, target, tmp_path):
    "Before quantizing: check_deployable(model, target, weights=fmt) raises exactly when the exporter would, with its message."
    model, tok = teacher.model, teacher.tokenizer
    export = (lambda s: export_gguf(s, tmp_path / 'x.gguf', tok)) if target == 'gguf' else (lambda s: export_compressed_tensors(s, tmp_path / 'x'))
    try: export(_student(model, fmt)); err = None
    except ValueError as e: err = str(e)
    if err is None: assert check_deployable(model, target, weights=fmt, tokenizer=tok if target == 'gguf' else None) == [target]
    else:
        with pytest.raises(ValueError) as e: check_deployable(model, target, weights=fmt)
        assert str(e.value) == err


def test_check_deployable_refuses(teacher):
    model, tok = teacher.model, teacher.tokenizer
    with pytest.raises(ValueError, match='inputs'): check_deployable(model, 'gguf', weights='gguf-q4_0', acts='int8-token')
    with pytest.raises(ValueError, match='vocabulary'):
        check_deployable(tiny_llama(vocab=97, hidden=32, layers=1, heads=2), 'gguf', weights='gguf-q4_0', tokenizer=tok)
    with pytest.raises(ValueError, match='Llama'): check_deployable(nn.Sequential(nn.Linear(32, 32)), 'gguf', weights='gguf-q4_0')
    with pytest.raises(ValueError, match='targets'): check_deployable(model, 'gguf,onnx', weights='gguf-q4_0')
    with pytest.raises(ValueError, match='no linear'): check_deployable(copy.deepcopy(model), 'gguf')   # FP model, no weights=
    assert check_deployable(_learned(model, 'gguf-q4_0', steps=1)) == ['gguf', 'compressed-tensors']   # a student's own formats


# ------------------------------------------------------------------ compressed-tensors
def test_ct_args_names_what_it_can_express():
    a = ct_args('int4-g128-asym')
    assert (a.num_bits, a.symmetric, a.strategy, a.group_size, a.type) == (4, False, 'group', 128, 'int')
    a = ct_args('int8')
    assert (a.num_bits, a.symmetric, a.strategy, a.group_size) == (8, True, 'channel', None)
    for f in ('nf4-g64', 'mxfp4', 'nvfp4', 'fp8-e4m3', 'int3-g128', 'int2-g64', 'int4-tensor', 'int8-token'):
        with pytest.raises(ValueError, match='W4A16'): ct_args(f)
    with pytest.raises(ValueError, match='divide'): ct_args('int4-g128', 96)


def _load_ct(path):
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=CompressedTensorsConfig(dequantize=True),
                                                dtype=torch.float32)


@pytest.mark.parametrize("fmt", ['int4-g32', 'int4-g32-asym', 'int8', 'int8-asym', 'int4-asym', 'int8-g32', 'gguf-q4_0', 'gguf-q8_0'])
def test_export_compressed_tensors_loaded_by_transformers(teacher, fmt, tmp_path):
    """transformers + compressed-tensors decompress exactly the student's weights (compared bit for bit), so the
    logits are bit-equal too: both sides run the same float32 LlamaForCausalLM code on the same tensors."""
    model, tok = teacher.model, teacher.tokenizer
    student = _student(model, fmt)
    path = export_compressed_tensors(student, tmp_path / 'ct', tok)
    qc = json.loads((path / 'config.json').read_text())['quantization_config']
    spec = fake_quant_layers(student)['model.layers.0.mlp.up_proj'].w_spec
    assert qc['quant_method'] == 'compressed-tensors' and qc['format'] == 'pack-quantized' and qc['ignore'] == ['lm_head']
    wq = qc['config_groups']['group_0']['weights']
    assert (wq['num_bits'], wq['symmetric'], wq['strategy'], wq['group_size']) == \
           (spec.bits, spec.symmetric, spec.granularity, spec.group_size)
    back = _load_ct(path)
    for n, m in fake_quant_layers(student).items():
        with torch.no_grad(): assert torch.equal(back.get_submodule(n).weight, m.quantized_weight()), n
    x = torch.from_numpy(random_tokens(64, len(tok), seed=3)).long().view(2, 32)
    with torch.no_grad(): assert torch.equal(back(x).logits, student(x).logits)
    assert AutoTokenizer.from_pretrained(str(path))(TEXT)['input_ids'] == tok(TEXT)['input_ids']


def test_export_compressed_tensors_learned_scales(teacher, tmp_path):
    "An LSQ student trained off round to nearest: its own scales and zero points are written, not re-derived ones."
    model = teacher.model
    student = _learned(model, 'int4-g32-asym')
    assert _off_rtn(student) == list(fake_quant_layers(student))          # every layer left the absmax grid
    path = export_compressed_tensors(student, tmp_path / 'lsq')
    back = _load_ct(path)
    for n, m in fake_quant_layers(student).items():
        with torch.no_grad(): assert torch.equal(back.get_submodule(n).weight, m.quantized_weight()), n
    x = torch.from_numpy(random_tokens(64, model.config.vocab_size, seed=4)).long().view(2, 32)
    with torch.no_grad(): assert torch.equal(back(x).logits, student(x).logits)


def test_export_compressed_tensors_refuses_mixed_formats(teacher, tmp_path):
    student = _student(teacher.model, 'int4-g32-asym')
    for n, m in list(fake_quant_layers(student).items()):
        if '.mlp.' in n:
            parent, _, child = n.rpartition('.')
            lin = nn.Linear(m.in_features, m.out_features, bias=False); lin.weight = m.weight
            setattr(student.get_submodule(parent), child, quantize_model(nn.Sequential(lin), 'int8')[0])
    with pytest.raises(ValueError, match='one weight format'): export_compressed_tensors(student, tmp_path / 'mixed')
    assert not (tmp_path / 'mixed').exists()


def test_export_compressed_tensors_refuses(teacher, tmp_path):
    model = teacher.model
    for fmt, kw in [('nf4-g64', {}), ('mxfp4', {}), ('int3-g32', {}), ('int4-g32', {'acts': 'int8-token'})]:
        with pytest.raises(ValueError, match='W4A16|inputs'): export_compressed_tensors(_student(model, fmt, **kw), tmp_path / 'no')
    with pytest.raises(ValueError, match='divide'): export_compressed_tensors(_student(model, 'int4-g128'), tmp_path / 'no')
    with pytest.raises(ValueError, match='FakeQuantLinear'): export_compressed_tensors(copy.deepcopy(model), tmp_path / 'no')
    assert not (tmp_path / 'no').exists()
    (tmp_path / 'theirs').mkdir(); (tmp_path / 'theirs' / 'notes.txt').write_text('keep')   # a folder kdq_bench did not write
    with pytest.raises(ValueError, match='not empty'): export_compressed_tensors(_student(model, 'int8'), tmp_path / 'theirs')
    assert [p.name for p in (tmp_path / 'theirs').iterdir()] == ['notes.txt']
    # an asymmetric group whose zero point falls outside the 4-bit range (all weights of one sign)
    s = _student(model, 'int4-g32-asym')
    lin = next(iter(fake_quant_layers(s).values()))
    with torch.no_grad(): lin.weight[0, :32] = torch.linspace(1.0, 2.0, 32)
    with pytest.raises(ValueError, match='zero point'): ct_compress(lin)


# ------------------------------------------------------------------ llama.cpp itself (slow: needs the deploy extra)
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KDQ_SLOW") != "1", reason="needs llama-cpp-python, the deploy extra (set KDQ_SLOW=1)")
@pytest.mark.parametrize("kind", ['gguf-q4_0', 'gguf-q8_0', 'mxfp4', 'learned gguf-q4_0', 'gptq gguf-q4_0'])
def test_llama_cpp_runs_the_export(teacher, kind, tmp_path):
    from kdq_bench.deploy import llama_cpp_model, llama_cpp_logits, llama_cpp_nll
    from kdq_bench.evaluate import window_plan, perplexity
    model, tok = teacher.model, teacher.tokenizer
    how, _, fmt = kind.rpartition(' ')
    student = {'': _student, 'learned': _learned, 'gptq': _gptq}[how](model, fmt)
    f = export_gguf(student, tmp_path / 's.gguf', tok)
    llm = llama_cpp_model(f, n_ctx=32, n_threads=2)
    ids = tok(TEXT)['input_ids'][:32]
    got = llama_cpp_logits(llm, ids)
    with torch.no_grad(): ref = student(torch.tensor([ids])).logits[0].numpy()
    # llama.cpp reads exactly these weights (tests above) but quantizes the activations of its Q4_0/Q8_0/MXFP4 matmuls
    # to 8 bits (Q8_0 vec_dot) and sums in another order: agreement to a fraction of a percent, not bit for bit
    # (measured on this model: max |diff| 3e-4 to 5e-4 on a logit range of 6.7, every argmax the same).
    assert np.abs(got - ref).max() < 0.01 * (ref.max() - ref.min())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    # llama.cpp tokenizes the text as the 🤗 tokenizer does
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tok(TEXT)['input_ids']
    # the same perplexity in both engines, over the same windows
    stream = np.asarray(tok(TEXT * 8)['input_ids'], dtype=np.int64)
    plan = window_plan(len(stream), 32, 16)
    total, count = llama_cpp_nll(llm, stream, plan, 32)
    ours = perplexity(student, stream, seq_len=32, stride=16, progress=False)
    llm.close()
    assert count == ours.n_tokens
    assert abs(total / count - ours.nll) < 0.002 * ours.nll      # measured: within 0.01%
