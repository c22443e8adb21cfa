"""Decode-shaped matmul speed of kdq_bench's packed layers (PackedLinear) against FP32 and BF16 F.linear.

Run: python benchmarks/bench_export.py [--shapes 4096x4096,11008x4096] [--batches 1,8] [--reps 15] [--threads 1]
For each weight shape (out x in) and batch size it times, round-robin in the same run, FP32 F.linear, BF16 F.linear and
PackedLinear on torch's CPU int4 kernel (int4-g128; float32 and bfloat16 compute), its int8 kernel (int8 per channel;
float32 and bfloat16 compute) and the dequantize-then-matmul fallback (int4-g128, nf4-g64; whole weight, and 256 rows
at a time), and prints the median
time, the ratio to FP32 F.linear (>1: slower), the weight bytes held in memory and the largest output difference from
F.linear on the fake-quantized FP32 weight. --threads 1 (default) gives stable numbers on a shared machine; multi-
threaded kernels are very sensitive to other processes taking cores.
"""
import argparse
import pandas as pd
import torch
from kdq_bench.export import packed_matmul_speed

CASES = (('int4-g128', 'int4pack', None), ('int4-g128', 'int4pack', torch.bfloat16),
         ('int8', 'int8pack', None), ('int8', 'int8pack', torch.bfloat16),
         ('int4-g128', 'dequant', None), ('int4-g128', 'dequant', None, 256),
         ('nf4-g64', 'dequant', None), ('nf4-g64', 'dequant', None, 256))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--shapes', default='4096x4096,11008x4096', help='weight shapes out x in, comma separated')
    ap.add_argument('--batches', default='1,8', help='rows of x (tokens decoded at once), comma separated')
    ap.add_argument('--reps', type=int, default=15)
    ap.add_argument('--threads', type=int, default=1, help='torch intra-op threads (0: leave torch default)')
    a = ap.parse_args()
    pd.set_option('display.width', 200)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {a.threads or torch.get_num_threads()}, {a.reps} runs per case (median)")
    for shape in a.shapes.split(','):
        out_f, in_f = (int(s) for s in shape.lower().split('x'))
        torch.manual_seed(0)
        w = torch.randn(out_f, in_f) * 0.02
        for m in (int(b) for b in a.batches.split(',')):
            x = torch.randn(m, in_f)
            print(f"\nW {out_f}x{in_f}, x [{m}, {in_f}]")
            print(packed_matmul_speed(w, x, CASES, reps=a.reps, threads=a.threads or None).to_string(index=False))


if __name__ == '__main__':
    main()
