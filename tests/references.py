"""Independent reference implementations the tests compare kdq_bench against (one home for each).

Written from the definitions (DESIGN.md, the formats' specifications), with loops and brute-force searches instead of
kdq_bench's vectorised code, so that a shared mistake is unlikely.
"""
import math

import torch

from kdq_bench.quantizers import NF4_CODEBOOK, FP4_E2M1_CODEBOOK, quantize


def ref_int(w, bits, group, symmetric):
    "Per-group integer fake quantization, a loop over rows and groups with the formula of DESIGN.md."
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], group):
            g = w[r, c:c + group]
            if symmetric:
                s = g.abs().max() / qmax
                s = torch.where(s > 0, s, torch.ones_like(s)); z = torch.zeros(())
            else:
                s = (g.max() - g.min()) / (qmax - qmin); z = torch.round(-g.min() / s)
            out[r, c:c + group] = (torch.clamp(torch.round(g / s) + z, qmin, qmax) - z) * s
    return out


def e2m1_ref(v):
    "Exhaustive nearest E2M1 with ties to the even mantissa (even magnitude indices), saturating at 6."
    mags = [0., .5, 1., 1.5, 2., 3., 4., 6.]
    out = []
    for x in v.tolist():
        a = min(abs(x), 6.0)
        d = [abs(a - m) for m in mags]
        best = min(d)
        cands = [i for i, di in enumerate(d) if di == best]
        i = next((c for c in cands if c % 2 == 0), cands[0])
        out.append(math.copysign(mags[i], x) if mags[i] else 0.0)
    return torch.tensor(out)


def brute_step(w, fmt):
    "Width of the grid cell [c_i, c_i+1) holding each element, from the format's sorted representable values."
    qt = quantize(w, fmt); spec = qt.spec
    if spec.kind in ('int', 'gguf'):
        lo, hi = (spec.qmin, spec.qmax) if spec.kind == 'int' else (-8, 7) if spec.ggml == 'q4_0' else (-127, 127)
        book = torch.arange(lo, hi + 1).float()
    elif spec.kind == 'nf4': book = NF4_CODEBOOK
    elif spec.kind == 'fp8':
        allv = torch.arange(256, dtype=torch.uint8).view({'e4m3': torch.float8_e4m3fn, 'e5m2': torch.float8_e5m2}[spec.fp8]).float()
        book = allv[allv.isfinite()].unique()
    else: book = FP4_E2M1_CODEBOOK.unique()
    g = spec.group_size if spec.granularity == 'group' else w.shape[1]
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for gi, c0 in enumerate(range(0, w.shape[1], g)):
            scale = qt.scale[0 if spec.granularity == 'tensor' else r, gi if spec.granularity == 'group' else 0]
            if qt.global_scale is not None: scale = scale * qt.global_scale
            scale = scale.abs()   # ggml's d is signed; the cell width is not
            u = w[r, c0:c0 + g] / scale
            i = (torch.searchsorted(book, u, right=True) - 1).clamp(0, len(book) - 2)
            out[r, c0:c0 + g] = (book[i + 1] - book[i]) * scale
    return out
