"""Downstream accuracy: the offline task generators, lm-evaluation-harness on in-memory models, and kdq_bench's own
computation of the same log-likelihood comparisons (tiny models only: a few seconds each)."""
import copy, math, os, random, socket

import numpy as np
import pytest
import torch

from kdq_bench.data import load_documents
from kdq_bench.downstream import (choice_accuracy, choice_examples, cloze_accuracy, cloze_examples, evaluate_tasks,
                                  frequent_words, offline_tasks, paired_difference, read_task, resolve_tasks,
                                  study_columns, write_task)
from kdq_bench.export import PackedLinear, load_quantized, round_dense, save_quantized
from kdq_bench.quantizers import quantize_model

# the tiny teacher has a 32-token context: short passages and continuations keep every request inside it
SMALL = dict(context_words=(8, 20), continuation_words=4)
SIZES = {'shakespeare_cloze': 40, 'shakespeare_choice': 30}


@pytest.fixture
def no_network(monkeypatch):
    "Any TCP connection or DNS lookup is recorded and refused (Unix sockets still work)."
    attempts = []
    connect = socket.socket.connect

    def guarded(self, addr):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(addr)
            raise OSError(f"network access attempted: {addr}")
        return connect(self, addr)

    def no_dns(host, *a, **k):
        attempts.append(host)
        raise socket.gaierror(f"DNS lookup attempted: {host}")

    monkeypatch.setattr(socket.socket, 'connect', guarded)
    monkeypatch.setattr(socket, 'getaddrinfo', no_dns)
    return attempts


def _docs_holding(text, docs):
    return [i for i, d in enumerate(docs) if text in d]


@pytest.mark.parametrize('corpus', ['shakespeare', 'kjv'])
def test_generators_deterministic_and_leak_free(corpus):
    test, train, val = (load_documents(corpus, s) for s in ('test', 'train', 'validation'))
    other = '\x1e'.join(train + val)
    docs = load_documents(corpus)
    cl = cloze_examples(corpus, 60, seed=0)
    assert cl == cloze_examples(corpus, 60, seed=0)
    assert cl != cloze_examples(corpus, 60, seed=1)
    common = frequent_words(test, 100)
    for e in cl:
        passage = e['context'] + ' ' + e['target']
        assert any(passage in u for u in test) and passage not in other
        assert e['target'].isalpha() and len(e['target']) >= 3 and e['target'].lower() not in common
        assert e['target'].lower() in e['context'].lower()
    ch = choice_examples(corpus, 60, seed=0)
    assert ch == choice_examples(corpus, 60, seed=0)
    assert sorted({e['label'] for e in ch}) == [0, 1, 2, 3]
    for e in ch:
        passage = e['context'] + e['choices'][e['label']]
        assert any(passage in u for u in test) and passage not in other
        home = _docs_holding(passage, docs)
        assert len(set(e['choices'])) == 4
        for k, c in enumerate(e['choices']):
            assert any(c in u for u in test)
            if k != e['label']:   # distractors come from other documents (independent check on the whole documents)
                assert set(_docs_holding(c, docs)) - set(home)
                assert len(c.split()) == len(e['choices'][e['label']].split())


def test_task_files_are_deterministic(tmp_path):
    a = write_task('shakespeare_choice', 25, 3, root=tmp_path / 'a', **SMALL)
    b = write_task('shakespeare_choice', 25, 3, root=tmp_path / 'b', **SMALL)
    assert (a / 'shakespeare_choice.jsonl').read_bytes() == (b / 'shakespeare_choice.jsonl').read_bytes()
    assert write_task('shakespeare_choice', 25, 3, root=tmp_path / 'a', **SMALL) == a
    assert read_task(a) == choice_examples('shakespeare', 25, 3, **SMALL)
    assert write_task('shakespeare_choice', 25, 4, root=tmp_path / 'a', **SMALL) != a


def test_harness_equals_direct_computation(tiny_teacher, no_network):
    model, tok = tiny_teacher
    import datasets
    env = lambda: {k: os.environ.get(k) for k in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'DISABLE_MULTIPROC')}
    before, offline = env(), datasets.config.HF_HUB_OFFLINE
    table = evaluate_tasks(tiny_teacher, tasks=list(SIZES), n=SIZES, samples=True, **SMALL)
    assert no_network == []
    assert env() == before and datasets.config.HF_HUB_OFFLINE == offline   # nothing left switched
    got = {(r.task, r.metric): (r.value, r.stderr, r.n) for r in table.itertuples()}
    cl = read_task(write_task('shakespeare_cloze', SIZES['shakespeare_cloze'], 0, **SMALL))
    ch = read_task(write_task('shakespeare_choice', SIZES['shakespeare_choice'], 0, **SMALL))
    dc, dm = cloze_accuracy(model, tok, cl), choice_accuracy(model, tok, ch)
    s = table.attrs['samples']
    # per example: the same log-likelihoods, greedy flags and choices
    np.testing.assert_allclose(s['shakespeare_cloze']['perplexity'].to_numpy(), dc['loglik'], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(s['shakespeare_cloze']['acc'].to_numpy(), dc['greedy'].astype(int))
    np.testing.assert_array_equal(s['shakespeare_choice']['acc'].to_numpy(), dm['correct'].astype(float))
    np.testing.assert_array_equal(s['shakespeare_choice']['acc_norm'].to_numpy(), dm['correct_norm'].astype(float))
    # aggregates, and the standard error of a mean as the harness defines it (sample std / sqrt(n))
    assert got['shakespeare_choice', 'acc'][0] == dm['acc'] and got['shakespeare_choice', 'acc_norm'][0] == dm['acc_norm']
    assert got['shakespeare_cloze', 'acc'][0] == dc['acc']
    assert math.isclose(got['shakespeare_cloze', 'perplexity'][0], dc['perplexity'], rel_tol=1e-4)
    for key, x in [(('shakespeare_choice', 'acc'), dm['correct']), (('shakespeare_choice', 'acc_norm'), dm['correct_norm'])]:
        assert math.isclose(got[key][1], np.std(x.astype(float), ddof=1) / math.sqrt(len(x)), rel_tol=1e-9)
        assert got[key][2] == SIZES['shakespeare_choice']
    assert 0 < dm['acc'] < 1   # not a degenerate comparison
    cols = study_columns(table)
    assert cols['shakespeare_choice/acc'] == dm['acc']
    assert cols['shakespeare_choice/acc_stderr'] == got['shakespeare_choice', 'acc'][1]
    assert set(cols) == {f"{t}/{m}{x}" for t, m in got for x in ('', '_stderr')}


def test_fake_quantized_and_packed_give_the_same_numbers(tiny_teacher, tmp_path, no_network):
    model, tok = tiny_teacher
    for ignore in (('lm_head',), ()):   # with the output head in full precision, and packed too (tied to the embedding)
        fq = quantize_model(copy.deepcopy(model), 'int4-g32', ignore=ignore).train()
        # dense tensors in bf16 (the default) with the reference rounded alike; with the head quantized and tied to the
        # embedding, rounding one would round the other (round_dense refuses), so that artifact keeps them in FP32
        path = save_quantized(fq, tmp_path / f"q{len(ignore)}", dense_dtype=torch.bfloat16 if ignore else None)
        if ignore: round_dense(fq)
        packed = load_quantized(path)
        assert any(isinstance(m, PackedLinear) for m in packed.modules())
        keys = list(packed.state_dict())
        a = evaluate_tasks(fq, tok, list(SIZES), n=SIZES, samples=True, **SMALL)
        b = evaluate_tasks(packed, tok, list(SIZES), n=SIZES, samples=True, **SMALL)
        assert a[['task', 'metric', 'value', 'stderr']].equals(b[['task', 'metric', 'value', 'stderr']])
        assert (paired_difference(b, a)['difference'] == 0).all()
        assert list(packed.state_dict()) == keys   # the harness did not re-tie a weight onto the packed head
        assert fq.training and not packed.training  # each model comes back in the mode it was given
    assert no_network == []


def test_paired_difference(tiny_teacher):
    model, tok = tiny_teacher
    fq = quantize_model(copy.deepcopy(model), 'int2-g32')
    n = {'shakespeare_choice': 20}
    a = evaluate_tasks(model, tok, ['shakespeare_choice'], n=n, samples=True, **SMALL)
    b = evaluate_tasks(fq, tok, ['shakespeare_choice'], n=n, samples=True, **SMALL)
    ex = read_task(write_task('shakespeare_choice', 20, 0, **SMALL))
    d = (choice_accuracy(fq, tok, ex)['correct'].astype(float) - choice_accuracy(model, tok, ex)['correct'].astype(float))
    row = paired_difference(b, a).set_index('metric').loc['acc']
    assert math.isclose(row['difference'], d.mean(), abs_tol=1e-12)
    assert math.isclose(row['stderr'], d.std(ddof=1) / math.sqrt(len(d)), rel_tol=1e-9)
    bare = b.copy(); bare.attrs = {}
    with pytest.raises(ValueError, match='samples=True'): paired_difference(bare, a)


def test_rtn_is_quantize_model(tiny_teacher):
    "The notebook's RTN row uses quantize_model (the notebook may not import ptq): the same model as ptq's 'rtn'."
    from kdq_bench.ptq import ptq
    model, _ = tiny_teacher
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        a = quantize_model(copy.deepcopy(model), 'int4-g32')(x).logits
        b = ptq(copy.deepcopy(model), 'rtn', weights='int4-g32')(x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_global_random_state_is_kept(tiny_teacher):
    random.seed(7); np.random.seed(7); torch.manual_seed(7)
    expect = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(7); np.random.seed(7); torch.manual_seed(7)
    evaluate_tasks(tiny_teacher, tasks=['shakespeare_cloze'], n={'shakespeare_cloze': 10}, **SMALL)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_bad_input_fails_clearly(tiny_teacher):
    model, tok = tiny_teacher
    with pytest.raises(ValueError, match='no tokenizer'): evaluate_tasks(model, None, ['shakespeare_cloze'])
    with pytest.raises(ValueError, match='PreTrainedModel'): evaluate_tasks(torch.nn.Linear(2, 2), tok, ['shakespeare_cloze'])
    with pytest.raises(ValueError, match='shakespeare_choice'): evaluate_tasks(model, tok, ['shakespear_choice'])
    with pytest.raises(ValueError, match="n names tasks not asked for"):
        evaluate_tasks(model, tok, ['shakespeare_cloze'], n={'kjv_cloze': 5})
    # the default 12-word choices do not fit a 32-token model: said before any evaluation
    with pytest.raises(ValueError, match="model's context is 32"):
        evaluate_tasks(model, tok, ['shakespeare_choice'], n={'shakespeare_choice': 10})
    with pytest.raises(ValueError, match='ask for n <='): cloze_examples('shakespeare', 100_000)
    with pytest.raises(ValueError, match='unknown corpus'): choice_examples('no-such-corpus', 5)
    assert 'linux-docs_cloze' in offline_tasks()


def test_harness_task_names():
    "Names the harness knows pass; others are rejected with the offline names and examples of harness names."
    assert resolve_tasks(['shakespeare_cloze', 'hellaswag', 'arc_easy']) == (['shakespeare_cloze'], ['hellaswag', 'arc_easy'])
    with pytest.raises(ValueError, match=r"(?s)no_such_task.*kjv_cloze.*hellaswag"): resolve_tasks(['no_such_task'])
