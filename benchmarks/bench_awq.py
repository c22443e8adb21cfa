"""AWQ's wall time on SmolLM2-135M at int4-g128 with the main job's calibration, and a checksum of the weights it leaves.

One process, one `awq` call on 32 windows of 256 tokens of Shakespeare's train split (calibration seed 0), as the main
job's AWQ row. Time it against another version of kdq_bench as a whole process, pairs in alternation, for example
the previous commit checked out beside this one:

    git worktree add /tmp/kdq-old HEAD~1
    farm-bench -n 3 --warmup 0 --timeout 3000 \
        --vs "sh -c 'PYTHONPATH=/tmp/kdq-old exec python benchmarks/bench_awq.py'" -- python benchmarks/bench_awq.py

The printed checksums (sum and absolute sum of every projection weight) must agree between the two versions when a
change claims to leave AWQ's result unchanged.
"""
import time
import torch
import kdq_bench
from kdq_bench.models import load_teacher
from kdq_bench.data import tokenize_split, calibration_set
from kdq_bench.ptq import awq

torch.manual_seed(0)
model, tok = load_teacher('smollm2-135m')
calib = calibration_set(tokenize_split('shakespeare', 'train', tok), 32, 256, seed=0)
t0 = time.time()
awq(model, calib, 'int4-g128')
seconds = time.time() - t0
w = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if 'proj' in n]).double()
print(f"kdq_bench from {kdq_bench.__file__}: awq {seconds:.1f} s, weight sum {w.sum().item():.6f}, |w| sum {w.abs().sum().item():.6f}")
