"""The KD+QAT recipe's pieces on tiny models: PTQ starts with unrounded masters, frozen and learned grids through training
and export, the block-wise phase (error per block, exact resume), the teacher-only loss and τ 'auto', damaged checkpoints."""
import copy, json, os, signal
from pathlib import Path

import numpy as np
import pytest
import torch

from kdq_bench.blockwise import BlockwiseConfig, blockwise_distill, block_mse
from kdq_bench.data import calibration_set, windows
from kdq_bench.export import save_quantized, load_quantized, round_dense
from kdq_bench.ptq import gptq, awq, rtn
from kdq_bench.quantizers import (fake_quant_layers, quantize_model, set_quantizer_mode, dequantize, fake_quant,
                                  FrozenQuantizer, LearnedQuantizer)
from kdq_bench.testing import tiny_llama
from kdq_bench.trainer import TrainConfig, Trainer, list_checkpoints, latest_checkpoint, checkpoint_problems, main

torch.set_num_threads(1)
V = 97


def toks(n=4096, seed=0):
    return (np.cumsum(np.random.default_rng(seed).integers(1, 4, n)) % V).astype(np.int32)


@pytest.fixture(scope='module')
def teacher(): return tiny_llama(vocab=V, hidden=32, layers=2, heads=2, kv_heads=2).requires_grad_(False)


@pytest.fixture(scope='module')
def tokens(): return toks()


def cfg(**over):
    base = {'training': {'method': 'kd+qat', 'steps': 8, 'batch_size': 4, 'seq_len': 32}, 'quantization': {'weights': 'int4-g16'},
            'optimizer': {'lr': 1e-3}, 'distillation': {'check_soft_targets': 'off'}}
    return TrainConfig.from_dict(base).override(**over)


# --- PTQ starts -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('method', ['rtn', 'gptq', 'awq'])
@pytest.mark.parametrize('fmt', ['int4-g16', 'int3-g16-asym', 'gguf-q4_0'])
def test_unrounded_masters_compute_what_the_grid_masters_compute(teacher, tokens, method, fmt):
    "The PTQ model is the same function with either masters; 'unrounded' masters are off the grid (so training can move them)."
    calib = calibration_set(tokens, 12, 32, seed=0)
    run = lambda m, masters: {'rtn': lambda: rtn(m, fmt, masters=masters), 'gptq': lambda: gptq(m, calib, fmt, progress=False, masters=masters),
                              'awq': lambda: awq(m, calib, fmt, progress=False, masters=masters)}[method]()
    grid, unrounded = run(copy.deepcopy(teacher), 'grid'), run(copy.deepcopy(teacher), 'unrounded')
    x = windows(tokens, [3, 4], 32)
    with torch.no_grad(): assert torch.equal(grid(x).logits, unrounded(x).logits)
    lg, lu = fake_quant_layers(grid), fake_quant_layers(unrounded)
    for n in lg:
        assert torch.equal(lg[n].weight, lg[n].quantized_weight()) and torch.equal(lu[n].quantized_weight(), lg[n].weight)
    assert any(not torch.equal(lu[n].weight, lu[n].quantized_weight()) for n in lu)


@pytest.mark.parametrize('init', ['rtn', 'gptq'])
def test_trainer_starts_from_the_ptq_model(teacher, tokens, init):
    c = cfg(**{'quantization.init': init, 'quantization.mode': 'frozen', 'quantization.calib_samples': 8, 'quantization.calib_seq_len': 32})
    tr = Trainer(c, teacher=teacher, train_tokens=tokens, progress=False)
    calib = calibration_set(tokens, 8, 32, seed=0)
    ref = gptq(copy.deepcopy(teacher), calib, 'int4-g16', progress=False) if init == 'gptq' else rtn(copy.deepcopy(teacher), 'int4-g16')
    x = windows(tokens, [1], 32)
    with torch.no_grad(): assert torch.equal(tr.student(x).logits, ref(x).logits)
    assert tr.seconds['init'] > 0 and all(m.weight_quantizer.mode == 'frozen' for m in fake_quant_layers(tr.student).values())


def test_frozen_grid_is_kept_through_training_and_export(teacher, tokens, tmp_path):
    c = cfg(**{'quantization.init': 'gptq', 'quantization.mode': 'frozen', 'quantization.calib_samples': 8, 'quantization.calib_seq_len': 32,
               'quantization.fake_quant_start': 0})
    tr = Trainer(c, teacher=teacher, train_tokens=tokens, progress=False)
    scales = {n: m.weight_quantizer.scale.clone() for n, m in fake_quant_layers(tr.student).items()}
    w0 = {n: m.weight.detach().clone() for n, m in fake_quant_layers(tr.student).items()}
    r = tr.fit()
    for n, m in fake_quant_layers(r.student).items():
        assert torch.equal(m.weight_quantizer.scale, scales[n])             # the grid did not move...
        assert not torch.equal(m.weight.detach(), w0[n])                    # ...the weights did
        assert torch.equal(dequantize(m.qtensor()), m.quantized_weight().detach())
    save_quantized(r.student, tmp_path/'a')
    back = load_quantized(tmp_path/'a', tiny_llama(vocab=V, hidden=32, layers=2, heads=2, kv_heads=2), backend='dequant')
    x = windows(tokens, [2], 32)
    round_dense(r.student)   # the reference: its dense tensors rounded to bf16 as the artifact stores them
    with torch.no_grad(): assert torch.equal(back(x).logits, r.student(x).logits)


def test_learned_scales_train_and_round_trip(teacher, tokens, tmp_path):
    c = cfg(**{'quantization.mode': 'learned', 'quantization.fake_quant_start': 0, 'optimizer.trainable': 'scales'})
    tr = Trainer(c, teacher=teacher, train_tokens=tokens, progress=False)
    assert [g['name'] for g in tr.optimizer.param_groups] == ['scales']
    s0 = {n: m.weight_quantizer.scale.detach().clone() for n, m in fake_quant_layers(tr.student).items()}
    w0 = {n: m.weight.detach().clone() for n, m in fake_quant_layers(tr.student).items()}
    r = tr.fit()
    moved = [not torch.equal(m.weight_quantizer.scale.detach(), s0[n]) for n, m in fake_quant_layers(r.student).items()]
    assert all(moved)
    assert all(torch.equal(m.weight.detach(), w0[n]) for n, m in fake_quant_layers(r.student).items())   # only scales trained
    save_quantized(r.student, tmp_path/'a')
    back = load_quantized(tmp_path/'a', tiny_llama(vocab=V, hidden=32, layers=2, heads=2, kv_heads=2), backend='dequant')
    x = windows(tokens, [2], 32)
    round_dense(r.student)   # the reference: its dense tensors rounded to bf16 as the artifact stores them
    with torch.no_grad(): assert torch.equal(back(x).logits, r.student(x).logits)


# --- the block-wise phase -----------------------------------------------------------------------------------------------
def _student(teacher, mode='learned', fmt='int2-g16-asym'):
    s = quantize_model(copy.deepcopy(teacher).requires_grad_(True), fmt)
    return set_quantizer_mode(s, mode)


def test_block_phase_lowers_every_block_error(teacher, tokens):
    calib = calibration_set(tokens, 16, 32, seed=3)
    s = _student(teacher)
    rep = blockwise_distill(s, teacher, calib, BlockwiseConfig(epochs=3, lr=1e-3, scale_lr=1e-3, batch_size=4), progress=False)
    assert len(rep) == 2 and all(r['mse_after'] < 0.9 * r['mse_before'] and not r['reverted'] for r in rep)
    assert all(r['steps'] == 3 * 4 for r in rep)


def test_block_phase_trains_only_the_chosen_groups(teacher, tokens):
    calib = calibration_set(tokens, 8, 32, seed=3)
    s = _student(teacher)
    w0 = {n: m.weight.detach().clone() for n, m in fake_quant_layers(s).items()}
    blockwise_distill(s, teacher, calib, BlockwiseConfig(epochs=1, trainable='scales', lr=1e-3, scale_lr=1e-3), progress=False)
    assert all(torch.equal(m.weight.detach(), w0[n]) for n, m in fake_quant_layers(s).items())
    with pytest.raises(ValueError, match="mode 'learned'"):
        blockwise_distill(_student(teacher, mode='frozen'), teacher, calib, BlockwiseConfig(trainable='both'), progress=False)


def test_block_phase_resumes_exactly(teacher, tokens, tmp_path):
    calib = calibration_set(tokens, 8, 32, seed=3)
    b = BlockwiseConfig(epochs=2, lr=1e-3, scale_lr=1e-3, batch_size=4)
    full = _student(teacher)
    blockwise_distill(full, teacher, calib, b, state_dir=tmp_path/'full', progress=False)
    part = _student(teacher)
    blockwise_distill(part, teacher, calib, b, state_dir=tmp_path/'part', progress=False)
    prog = json.loads((tmp_path/'part'/'progress.json').read_text())
    prog['done'] = 1; prog['report'] = prog['report'][:1]             # as if interrupted during block 1
    (tmp_path/'part'/'progress.json').write_text(json.dumps(prog))
    resumed = _student(teacher)                                        # a fresh student: block 0 comes from the saved state
    rep = blockwise_distill(resumed, teacher, calib, b, state_dir=tmp_path/'part', progress=False)
    assert [r['block'] for r in rep] == [0, 1]
    sf, sr = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(sf[k], sr[k]) for k in sf)


def test_block_phase_ignores_the_state_of_another_start_or_settings(teacher, tokens, tmp_path, capsys):
    "Saved blocks serve only the phase that made them (same settings, calibration and start); others start it over."
    calib = calibration_set(tokens, 8, 32, seed=3)
    b, other = (BlockwiseConfig(epochs=2, lr=lr, scale_lr=1e-3, batch_size=4, trainable='weights') for lr in (1e-3, 3e-3))
    blockwise_distill(_student(teacher), teacher, calib, b, state_dir=tmp_path/'s', progress=False)
    marker = json.loads((tmp_path/'s'/'.kdq_bench.json').read_text())
    assert marker['kind'] == 'blockwise-state' and 'progress.json' in marker['files'] and 'block-000.safetensors' in marker['files']
    for start, cfg in ((_student(teacher), other), (_student(teacher, mode='frozen'), b)):   # other settings; another start
        ref = copy.deepcopy(start); blockwise_distill(ref, teacher, calib, cfg, progress=False)
        rep = blockwise_distill(start, teacher, calib, cfg, state_dir=tmp_path/'s', progress=True)
        assert 'starting the phase over' in capsys.readouterr().err and [r['block'] for r in rep] == list(range(len(rep)))
        sr, ss = ref.state_dict(), start.state_dict()
        assert all(torch.equal(sr[k], ss[k]) for k in sr)


def test_trainer_block_phase_then_e2e(teacher, tokens, tmp_path):
    c = cfg(**{'quantization.mode': 'learned', 'quantization.weights': 'int2-g16-asym', 'blockwise.enabled': True, 'blockwise.samples': 8,
               'blockwise.seq_len': 32, 'blockwise.epochs': 4, 'blockwise.lr': 1e-3, 'blockwise.scale_lr': 1e-3,
               'training.output_dir': str(tmp_path/'run')})
    r = Trainer(c, teacher=teacher, train_tokens=tokens, progress=False).fit()
    assert len(r.blockwise) == 2 and all(b['mse_after'] < b['mse_before'] for b in r.blockwise)
    assert set(r.seconds) >= {'blockwise', 'e2e'} and (tmp_path/'run'/'blockwise'/'progress.json').exists()
    with pytest.raises(ValueError, match='block-wise phase reconstructs'): cfg(**{'training.method': 'kd', 'blockwise.enabled': True})


# --- teacher-only loss and temperature -----------------------------------------------------------------------------------
def test_teacher_only_loss_and_auto_temperature(teacher, tokens):
    c = cfg(**{'distillation.loss': 'teacher', 'distillation.temperature': 'auto'})
    tr = Trainer(c, teacher=teacher, train_tokens=tokens, progress=False)
    r = tr.fit()
    assert all(h['lam'] == 1.0 and h['gam'] == 0.0 and h['quant_enabled'] for h in r.history)
    assert all(h['loss'] == pytest.approx(h['distill'], rel=1e-9) for h in r.history)     # no task term in the objective
    assert r.soft_targets['tau'] == tr.loss.tau and tr.loss.tau in (1.0, 1.5, 2.0, 3.0, 4.0)


# --- checks before work ---------------------------------------------------------------------------------------------------
def test_bad_runs_refused_before_work(teacher, tokens):
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        Trainer(cfg(**{'training.seq_len': 100}), teacher=teacher, train_tokens=tokens, progress=False)
    with pytest.raises(ValueError, match='would never quantize'): cfg(**{'quantization.fake_quant_start': 8})
    with pytest.raises(ValueError, match="mode to 'learned'"): cfg(**{'optimizer.trainable': 'scales'})


def test_train_cli_refuses_runs_that_keep_nothing(tmp_path, capsys):
    f = tmp_path/'c.yaml'
    f.write_text('training: {teacher: embedded, steps: 2}\n')
    with pytest.raises(SystemExit) as e: main(['--config', str(f)])
    assert e.value.code == 2 and 'output_dir is not set' in capsys.readouterr().err
    f.write_text('training: {steps: 2, output_dir: x}\n')
    with pytest.raises(SystemExit) as e: main(['--config', str(f)])
    assert e.value.code == 2 and 'training.teacher is not set' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: main(['--config', str(tmp_path/'missing.yaml')])
    assert e.value.code == 2 and 'not found' in capsys.readouterr().err


# --- damaged checkpoints -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('damage', ['flip', 'truncate', 'remove-optimizer', 'bad-json', 'remove-rng'])
def test_damaged_latest_checkpoint_falls_back(teacher, tokens, tmp_path, damage):
    run = tmp_path/'run'
    c = cfg(**{'training.output_dir': str(run), 'training.checkpoint_every': 4, 'training.keep_checkpoints': 3})
    full = Trainer(c, teacher=teacher, train_tokens=tokens, progress=False).fit()
    ck = list_checkpoints(run)[-1]
    f = {'flip': 'student.safetensors', 'truncate': 'student.safetensors', 'remove-optimizer': 'optimizer.pt',
         'bad-json': 'trainer_state.json', 'remove-rng': 'rng.safetensors'}[damage]
    if damage == 'flip': b = bytearray((ck/f).read_bytes()); b[len(b) // 2] ^= 0x10; (ck/f).write_bytes(bytes(b))
    elif damage == 'truncate': (ck/f).write_bytes((ck/f).read_bytes()[:100])
    elif damage == 'bad-json': (ck/f).write_text('{"step": ')
    else: (ck/f).unlink()
    assert checkpoint_problems(ck)
    with pytest.warns(UserWarning, match='damaged'): assert latest_checkpoint(run).name == 'step-00000004'
    with pytest.warns(UserWarning, match='damaged'):
        again = Trainer(c, teacher=teacher, train_tokens=tokens, progress=False).fit(resume=True)
    assert [h['step'] for h in again.history] == list(range(1, 9))
    for a, b in zip(full.history, again.history): assert a['loss'] == pytest.approx(b['loss'], rel=1e-6)


def test_checkpoint_write_failure_keeps_the_previous_one(teacher, tokens, tmp_path, monkeypatch):
    "A full disk at a save: the error names the path, no temporary is left, the previous checkpoint is intact."
    import errno, kdq_bench.trainer as T
    run = tmp_path/'run'
    c = cfg(**{'training.output_dir': str(run), 'training.checkpoint_every': 4})
    real = T.save_file
    def full_disk(tensors, path, metadata=None):
        if 'step-00000008' in str(Path(path).parent) or '.step-00000008' in str(path): raise OSError(errno.ENOSPC, 'No space left on device', str(path))
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(T, 'save_file', full_disk)
    with pytest.raises(OSError) as e: Trainer(c, teacher=teacher, train_tokens=tokens, progress=False).fit()
    assert 'step-00000008' in str(e.value) and 'No space left' in str(e.value)
    assert [p.name for p in (run/'checkpoints').iterdir()] == ['step-00000004']
    assert not checkpoint_problems(run/'checkpoints'/'step-00000004')


def test_block_phase_never_leaves_a_block_worse(teacher, tokens):
    "A learning rate far too high: blocks that got worse are reverted to their start, and the report says so."
    calib = calibration_set(tokens, 8, 32, seed=3)
    s = _student(teacher, fmt='int4-g16')
    before = {k: v.clone() for k, v in s.state_dict().items()}
    rep = blockwise_distill(s, teacher, calib, BlockwiseConfig(epochs=1, lr=10.0, scale_lr=10.0), progress=False)
    assert all(r['mse_after'] <= r['mse_before'] for r in rep) and any(r['reverted'] for r in rep)
    for r in rep:
        if r['reverted']:
            sd = s.model.layers[r['block']].state_dict()
            assert all(torch.equal(v, before[f"model.layers.{r['block']}.{k}"]) for k, v in sd.items())
