"""Throughput of kdq_bench's fake quantization against a plain copy (its memory-bound floor) and torchao.

Run: python benchmarks/bench_fake_quant.py [--size 4096] [--repeats 15]
Prints, for each format, the median time of eager and torch.compile'd fake_quant (forward, and forward + STE
backward), as GB/s (bytes read + written) and as a ratio to a tensor copy measured in the same run.
"""
import argparse, statistics, time, warnings
import torch
from kdq_bench.quantizers import fake_quant


def median_seconds(fn, repeats, warmup=3):
    for _ in range(warmup): fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def torchao_int4_g128():
    "torchao's QAT fake quantizer for symmetric int4 groups of 128, or None if it cannot run here."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer
            return IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=128, is_symmetric=True))
    except Exception as e:  # noqa: BLE001 - a missing optional reference is reported, not fatal
        print(f"torchao unavailable: {e}")
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--size', type=int, default=4096)
    ap.add_argument('--repeats', type=int, default=15)
    ap.add_argument('--formats', default='int4-g128,nf4-g64,nvfp4')
    a = ap.parse_args()
    torch.manual_seed(0)
    w = torch.randn(a.size, a.size)
    nbytes = 2 * w.numel() * w.element_size()   # read + write
    out = torch.empty_like(w)
    # fake_quant returns a new tensor, so its floor is a copy into a new tensor (clone): same allocation cost
    t_copy = median_seconds(lambda: w.clone(), a.repeats)
    t_copy_pre = median_seconds(lambda: out.copy_(w), a.repeats)
    wg = w.clone().requires_grad_(True)
    g = torch.ones_like(w)
    def fwd_bwd(f):
        def run():
            wg.grad = None
            f(wg).backward(g)
        return run
    t_copy_train = median_seconds(lambda: (w.clone(), g.clone()), a.repeats)  # fwd + bwd each move the tensor once
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, weight {a.size}x{a.size} fp32, "
          f"median of {a.repeats}")
    print(f"copy (clone, new tensor): {nbytes / t_copy / 1e9:.2f} GB/s; copy into a preallocated tensor: "
          f"{nbytes / t_copy_pre / 1e9:.2f} GB/s")
    print(f"{'format':12s} {'path':10s} {'fwd GB/s':>9s} {'fwd/copy':>9s} {'fwd+bwd/copy':>13s}")
    for fmt in a.formats.split(','):
        for path, compiled in [('eager', False), ('compiled', True)]:
            f = lambda x, fmt=fmt, c=compiled: fake_quant(x, fmt, compiled=c)
            t0 = time.perf_counter(); f(w); f(wg).backward(g); tc = time.perf_counter() - t0
            t = median_seconds(lambda: f(w), a.repeats)
            tt = median_seconds(fwd_bwd(f), a.repeats)
            print(f"{fmt:12s} {path:10s} {nbytes / t / 1e9:9.2f} {t_copy / t:9.2f} {t_copy_train / tt:13.2f}"
                  + (f"   (first call incl. compile {tc:.1f} s)" if compiled else ""))
    ao = torchao_int4_g128()
    if ao is not None:
        for path, fn in [('eager', ao), ('compiled', torch.compile(ao))]:
            fn(w); fn(wg).backward(g)
            t = median_seconds(lambda: fn(w), a.repeats)
            tt = median_seconds(fwd_bwd(fn), a.repeats)
            print(f"{'torchao-i4g128':12s} {path:10s} {nbytes / t / 1e9:9.2f} {t_copy / t:9.2f} {t_copy_train / tt:13.2f}")
        d = (ao(w) - fake_quant(w, 'int4-g128')).abs().max().item()
        print(f"max |torchao - kdq_bench| on int4-g128: {d:.3g}")


if __name__ == '__main__':
    main()
