"""Tests of kdq_bench.evaluate against independent per-token references."""
import math, os, tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_model
from tokenizers import Tokenizer, models as tkm, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdq_bench.evaluate import (window_plan, perplexity, evaluate_text, evaluate_split, model_size_bytes, latency,
                                greedy_decode, PerplexityResult)


class Bigram(nn.Module):
    def __init__(self, vocab, seed=0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    def forward(self, x): return self.W[x]


def tiny_llama(vocab=50, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)).eval()


def reference_nll(model, tokens, seq_len, stride):
    """Independent loop: one forward per window, one token at a time, the scoring rule written out."""
    n = len(tokens)
    starts = list(range(0, n - seq_len + 1, stride))
    if starts[-1] + seq_len < n: starts.append(n - seq_len)
    scored, nlls = set(), []
    for b in starts:
        x = torch.as_tensor(tokens[b:b + seq_len]).long()[None]
        with torch.no_grad(): logits = model(x)
        logits = (logits.logits if hasattr(logits, "logits") else logits)[0].double()
        for j in range(1, seq_len):               # position 0 of a window has no context
            p = b + j
            if p in scored: continue
            scored.add(p)
            nlls.append(-torch.log_softmax(logits[j - 1], -1)[tokens[p]].item())
    return float(np.sum(nlls)), len(nlls), scored


# --- windows ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,seq_len,stride", [(10, 4, 2), (11, 4, 2), (12, 4, 4), (13, 4, 4), (50, 8, 1), (50, 8, 3),
                                              (50, 8, 7), (64, 8, 8), (8, 8, 8), (9, 8, 5)])
def test_window_plan_properties(n, seq_len, stride):
    plan = window_plan(n, seq_len, stride)
    covered = []
    prev_end = 0
    for b, first in plan:
        assert 0 <= b and b + seq_len <= n                                 # full windows inside the stream
        assert first == max(prev_end, b + 1)                               # only new tokens, never the window's first
        covered += list(range(first, b + seq_len))
        prev_end = b + seq_len
    assert len(covered) == len(set(covered))                               # each token at most once
    assert plan[-1][0] + seq_len == n                                      # the stream is covered to its end
    starts = [b for b, _ in plan]
    if stride < seq_len: assert sorted(covered) == list(range(1, n))      # overlapping windows score everything
    else: assert set(range(1, n)) - set(covered) == set(starts[1:]) - set(covered)


def test_window_plan_errors():
    with pytest.raises(ValueError, match="shorter than one window"): window_plan(5, 8)
    with pytest.raises(ValueError, match="stride must be in"): window_plan(50, 8, 9)
    with pytest.raises(ValueError, match="stride must be in"): window_plan(50, 8, 0)
    with pytest.raises(ValueError, match="at least 2"): window_plan(50, 1)


# --- perplexity -----------------------------------------------------------------------------------------------------
def test_bigram_exact():
    """A bigram model's NLL does not depend on the context: every stride < seq_len gives the plain per-token mean."""
    m = Bigram(13)
    toks = torch.randint(0, 13, (157,), generator=torch.Generator().manual_seed(1))
    logp = torch.log_softmax(m.W.detach(), -1)
    ref = -np.mean([logp[toks[i - 1], toks[i]].item() for i in range(1, len(toks))])
    for stride in (1, 5, 19, 31):
        r = perplexity(m, toks, seq_len=32, stride=stride, batch_size=4, progress=False)
        assert r.n_tokens == 156 and abs(r.nll - ref) < 1e-12 and abs(r.ppl - math.exp(ref)) < 1e-9


@pytest.mark.parametrize("stride,batch_size", [(16, 1), (16, 3), (8, 2), (5, 4), (1, 64)])
def test_transformer_matches_per_token_loop(stride, batch_size):
    m = tiny_llama()
    toks = np.random.default_rng(0).integers(0, 50, 101).astype(np.int32)
    total, count, _ = reference_nll(m, toks, 16, stride)
    r = perplexity(m, toks, seq_len=16, stride=stride, batch_size=batch_size, progress=False)
    assert r.n_tokens == count and r.n_windows == len(window_plan(101, 16, stride))
    assert abs(r.total_nll - total) < 1e-4 * count and abs(r.nll - total / count) < 1e-5
    assert abs(r.ppl - math.exp(total / count)) < 1e-4 * r.ppl
    assert (r.seq_len, r.stride) == (16, stride)


def test_stride_changes_context_not_count():
    m = tiny_llama()
    toks = np.random.default_rng(1).integers(0, 50, 200)
    full = perplexity(m, toks, 16, 16, progress=False)
    half = perplexity(m, toks, 16, 8, progress=False)
    assert half.n_tokens == 199                                  # every token after the first
    assert full.n_tokens == 199 - (len(window_plan(200, 16)) - 1) + (0 if 200 % 16 == 0 else 1)
    assert half.n_windows > full.n_windows


def test_max_tokens_and_restores_mode():
    m = tiny_llama(); m.train()
    toks = np.random.default_rng(2).integers(0, 50, 300)
    a = perplexity(m, toks, 16, max_tokens=64, progress=False)
    b = perplexity(m, toks[:64], 16, progress=False)
    assert (a.n_tokens, a.total_nll) == (b.n_tokens, b.total_nll)
    assert m.training                                            # given back in train mode
    with pytest.raises(ValueError, match="shorter than one window"): perplexity(m, toks, 16, max_tokens=10)


def test_bad_inputs():
    m = Bigram(5)
    with pytest.raises(ValueError, match="empty"): perplexity(m, [], 4)
    with pytest.raises(ValueError, match="empty"): perplexity(m, np.zeros(0, dtype=np.int32), 4)
    with pytest.raises(ValueError, match="1-D"): perplexity(m, torch.zeros(2, 8, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="integer"): perplexity(m, torch.zeros(8), 4)


# --- bits per character ---------------------------------------------------------------------------------------------
def char_tokenizer(alphabet):
    vocab = {"<s>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    t = Tokenizer(tkm.WordLevel(vocab, unk_token="<s>")); t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>"), vocab


def test_bpc_char_level_exact():
    tok, vocab = char_tokenizer("abcde \n")
    m = Bigram(len(vocab), seed=3)
    docs = ["abc dea bad", "cab\nbead ace", "e"]
    text = "\n\n".join(docs)
    r = evaluate_text(m, tok, docs, seq_len=6, progress=False)
    ids = [0] + [vocab[c] for c in text]
    logp = torch.log_softmax(m.W.detach(), -1)
    bits = -sum(logp[ids[i - 1], ids[i]].item() for i in range(1, len(ids))) / math.log(2)
    assert r.n_chars == len(text) == r.n_tokens
    assert abs(r.bpc - bits / len(text)) < 1e-12
    assert abs(r.bits_per_token - r.nll / math.log(2)) < 1e-15
    assert evaluate_text(m, tok, text, seq_len=6, progress=False).total_nll == r.total_nll   # str or list alike
    short = evaluate_text(m, tok, docs, seq_len=6, max_chars=10, progress=False)
    assert short.n_chars == 10


def test_bpc_multichar_tokens_transformer():
    """BPE-like tokens (several characters each): bpc = all scored bits / characters of the text."""
    from kdq_bench.models import train_tokenizer
    texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 10
    tok = train_tokenizer(texts, vocab_size=280)
    m = tiny_llama(vocab=len(tok))
    text = "the cat sat on the log and the dog sat on the mat, a cat and a dog"
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
    assert len(ids) < len(text) + 1                            # tokens really are multi-character
    total, count, _ = reference_nll(m, ids, 8, 4)
    r = evaluate_text(m, tok, text, seq_len=8, progress=False)
    assert r.n_tokens == count == len(ids) - 1
    assert abs(r.bpc - total / math.log(2) / len(text)) < 1e-5


def test_empty_and_short_text():
    tok, vocab = char_tokenizer("ab")
    m = Bigram(3)
    with pytest.raises(ValueError, match="empty"): evaluate_text(m, tok, "", seq_len=4)
    with pytest.raises(ValueError, match="empty"): evaluate_text(m, tok, [], seq_len=4)
    with pytest.raises(ValueError, match="shorter than one window"): evaluate_text(m, tok, "ab", seq_len=4)


def test_evaluate_split_matches_text(tmp_path, monkeypatch):
    monkeypatch.setenv("KDQ_BENCH_CACHE", str(tmp_path))
    from kdq_bench.data import load_documents
    from kdq_bench.models import train_tokenizer
    docs = load_documents("shakespeare", "validation")
    tok = train_tokenizer(docs[:3], vocab_size=300)
    m = tiny_llama(vocab=len(tok))
    a = evaluate_split(m, tok, "shakespeare", "validation", seq_len=32, max_chars=3000, progress=False)
    b = evaluate_text(m, tok, "\n\n".join(docs)[:3000], seq_len=32, progress=False)
    assert a.n_chars == 3000 and (a.n_tokens, a.total_nll) == (b.n_tokens, b.total_nll)
    assert 0 < a.bpc < math.log2(len(tok)) * a.n_tokens / a.n_chars + 1


# --- size and latency -----------------------------------------------------------------------------------------------
def test_model_size_bytes(tmp_path):
    m = tiny_llama()
    n = model_size_bytes(m)
    save_model(m, str(tmp_path / "m.safetensors"))
    assert n == (tmp_path / "m.safetensors").stat().st_size == model_size_bytes(tmp_path / "m.safetensors")
    header = int.from_bytes((tmp_path / "m.safetensors").read_bytes()[:8], "little")
    n_params = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    n_buffers = sum(b.numel() * b.element_size() for k, b in m.state_dict().items() if k not in dict(m.named_parameters()))
    assert n == 8 + header + 4 * n_params + n_buffers
    (tmp_path / "extra.json").write_text("{}")
    sub = tmp_path / "sub"; sub.mkdir(); (sub / "x.bin").write_bytes(b"1234567")
    assert model_size_bytes(tmp_path) == n + 2 + 7
    with pytest.raises(ValueError, match="not found"): model_size_bytes(tmp_path / "missing")


def test_greedy_decode_matches_generate():
    m = tiny_llama()
    x = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = greedy_decode(m, x, new_tokens=9)
    ref = m.generate(x, max_new_tokens=9, min_new_tokens=9, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, ref)
    # and without the cache: argmax of a full forward at every step
    ids = x.clone()
    with torch.no_grad():
        for _ in range(9): ids = torch.cat([ids, m(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(ours, ids)


def test_latency():
    m = tiny_llama(); m.train()
    r = latency(m, seq_len=16, batch_size=2, new_tokens=4, runs=3)
    assert r.forward_ms > 0 and r.decode_ms > 0 and abs(r.per_token_ms - r.decode_ms / 4) < 1e-9
    assert (r.batch_size, r.seq_len, r.new_tokens, r.runs) == (2, 16, 4, 3)
    assert m.training
    with pytest.raises(ValueError, match=">= 1"): latency(m, runs=0)


def test_start_token_choice():
    from kdq_bench.evaluate import start_token_id
    tok, vocab = char_tokenizer("abc")
    m = Bigram(len(vocab), seed=4)
    text = "abcabcbbac"
    none = evaluate_text(m, tok, text, seq_len=4, start=None, progress=False)
    assert none.n_tokens == len(text) - 1                        # the first character has no context
    logp = torch.log_softmax(m.W.detach(), -1)
    ids = [vocab[c] for c in text]
    assert abs(none.total_nll + sum(logp[ids[i - 1], ids[i]].item() for i in range(1, len(ids)))) < 1e-12
    by_name = evaluate_text(m, tok, text, seq_len=4, start="a", progress=False)
    assert by_name.n_tokens == len(text)
    assert abs(by_name.total_nll - none.total_nll + logp[vocab["a"], ids[0]].item()) < 1e-12
    with pytest.raises(ValueError, match="not in the tokenizer"): evaluate_text(m, tok, text, seq_len=4, start="zz")
    # '<|endoftext|>' wins over BOS when the vocabulary has it (SmolLM2: BOS is the chat token <|im_start|>)
    t = Tokenizer(tkm.WordLevel({"<|im_start|>": 0, "<|endoftext|>": 1, "x": 2}, unk_token="x"))
    fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|im_start|>", eos_token="<|endoftext|>")
    assert start_token_id(fast) == 1 and start_token_id(tok) == 0
