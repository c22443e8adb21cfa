"""`kdq-bench sweep` end to end on the tiny teacher: a 2×2 grid of the comparison study through a real single-node Slurm
(sbatch job arrays, a preemption requeued by submitit, a cancelled job) and through the local pool (the documented
command of the "Run on a cluster" page, a killed point), a trainer point under torchrun, and the unit rules (grid
expansion, run ids, refusals)."""
import csv, dataclasses, json, math, os, re, shutil, signal, socket, subprocess, sys, tempfile, threading, time
from pathlib import Path

import nbformat
import pytest
import yaml

from kdq_bench.cli import main
from kdq_bench.sweeps import MARKER, expand_grid, load_sweep, notebook_parameters, read_status, run_id, trainer_command
from kdq_bench.trainer import list_checkpoints

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO/'nbs'/'experiments'/'sweeps'/'quickstart.yaml'
PAGE = REPO/'nbs'/'experiments'/'cluster.ipynb'


# ---------------------------------------------------------------------------------------------------------------------
# A real single-node Slurm cluster
# ---------------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged with a generated key, slurmctld and slurmd from a temporary slurm.conf (select/cons_tres, proctrack/linuxproc,
    no cgroup, no accounting), one node `localhost` with this machine's CPUs and 90% of its memory, all as root.
    Every file lives in one temporary folder; `stop()` cancels the cluster's jobs, stops only the daemons it started and
    removes only that folder."""

    def __init__(self): self.root, self.procs = None, []

    @property
    def env(self) -> dict: return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout=60):
        missing = [d for d in ('munged', 'slurmctld', 'slurmd', 'sbatch', 'squeue', 'scancel', 'sinfo') if not shutil.which(d)]
        if missing: raise RuntimeError(f"Slurm is not installed ({', '.join(missing)} missing): install Debian's slurm-wlm and munge, as .ci/run does")
        if os.geteuid() != 0: raise RuntimeError("the test Slurm cluster runs its daemons as root: run the tests as root, as CI does")
        self.root = Path(tempfile.mkdtemp(prefix='kdq-slurm-'))
        os.chmod(self.root, 0o755)
        munge = self.root/'munge'
        munge.mkdir(mode=0o700)
        key = munge/'munge.key'
        key.write_bytes(os.urandom(1024)); os.chmod(key, 0o400)
        sock = munge/'munge.socket'
        for d in ('state', 'spool', 'logs'): (self.root/d).mkdir()
        mem = int(int(Path('/proc/meminfo').read_text().split('MemTotal:')[1].split()[0]) / 1024 * 0.9)
        self.conf = self.root/'slurm.conf'
        self.conf.write_text(f"""ClusterName=kdqtest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/logs/slurmctld.log
SlurmdLogFile={self.root}/logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=3
MinJobAge=600
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        def launch(name, cmd):
            with open(self.root/'logs'/f'{name}.out', 'w') as out:
                self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env))
        launch('munged', ['munged', '--foreground', '--force', f'--socket={sock}', f'--key-file={key}', f'--pid-file={munge}/munged.pid',
                          f'--log-file={munge}/munged.log', f'--seed-file={munge}/munged.seed'])
        self._wait(sock.exists, timeout, 'munged to open its socket')
        launch('slurmctld', ['slurmctld', '-D', '-i', '-f', str(self.conf)])
        launch('slurmd', ['slurmd', '-D', '-N', 'localhost', '-f', str(self.conf)])
        self._wait(lambda: self.run('sinfo', '-h', '-o', '%T', check=False).stdout.strip() == 'idle', timeout, 'the node to be idle')
        return self

    def _wait(self, ok, timeout, what):
        t0 = time.time()
        while time.time() - t0 < timeout:
            for p in self.procs:
                if p.poll() is not None: raise RuntimeError(f"{p.args[0]} exited ({p.returncode}) while waiting for {what}:\n{self.logs()}")
            if ok(): return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        return '\n'.join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted((self.root/'logs').glob('*')))

    def run(self, *cmd, check=True) -> subprocess.CompletedProcess:
        "A Slurm client command against this cluster."
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and r.returncode: raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")
        return r

    def states(self) -> dict:
        "{job id: state} of every job the cluster knows (array tasks one by one)."
        return dict(l.split('|') for l in self.run('squeue', '-h', '-r', '-t', 'all', '-o', '%i|%T').stdout.split())

    def stop(self):
        if self.root is None: return
        try:
            if all(p.poll() is None for p in self.procs):
                self.run('scancel', '--user', 'root', check=False)
                t0 = time.time()
                while time.time() - t0 < 30 and any(s in ('RUNNING', 'COMPLETING', 'PENDING', 'REQUEUED') for s in self.states().values()):
                    time.sleep(0.5)
        finally:
            for p in reversed(self.procs):           # slurmd, slurmctld, munged: only the daemons started here
                if p.poll() is None:
                    p.terminate()
                    try: p.wait(15)
                    except subprocess.TimeoutExpired: p.kill(); p.wait()
            self.procs = []
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


@pytest.fixture(scope='module')
def slurm():
    "A running single-node Slurm cluster; SLURM_CONF points the client commands (and the sweep) at it."
    cluster = SlurmCluster()
    old = os.environ.get('SLURM_CONF')
    try:
        cluster.start()
        os.environ['SLURM_CONF'] = str(cluster.conf)
        yield cluster
    finally:
        if old is None: os.environ.pop('SLURM_CONF', None)
        else: os.environ['SLURM_CONF'] = old
        cluster.stop()


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------

def sweep_file(path:Path, teacher, **over) -> Path:
    "The documented quickstart sweep with the tiny teacher and the given top-level keys replaced."
    d = yaml.safe_load(QUICKSTART.read_text())
    d['params']['teacher'] = str(teacher)
    d.update(over)
    for k in d['grid'].get('product', {}): d['params'].pop(k, None)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path

def wait_for(ok, what, timeout=240, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = ok()
        if v: return v
        if proc is not None and proc.poll() is not None: raise AssertionError(f"the sweep ended ({proc.poll()}) while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")

def checkpoint_of(point):
    "The latest checkpoint of the point's trained row, if one exists."
    cks = [c for d in (point.folder/'runs').glob('*') for c in list_checkpoints(d)] if (point.folder/'runs').exists() else []
    return cks[-1] if cks else None

def curve_lines(point) -> list[str]:
    return [l for d in (point.folder/'runs').glob('*') for l in (d/'metrics.jsonl').read_text().splitlines()]

def read_csv(path) -> list[dict]:
    with open(path) as f: return list(csv.DictReader(f))

def check_table_against_points(sweep):
    "Every row of every point's own metrics.json is in sweep.csv (under its grid values), with the same perplexity."
    table = [r for r in read_csv(sweep.folder/'sweep.csv') if r['status'] == 'done']
    keys = [k for k in sweep.swept if k not in ('weights', 'seed')]
    seen = 0
    for p in sweep.points:
        for r in json.loads((p.folder/'metrics.json').read_text())['rows']:
            hit = [t for t in table if t['method'] == r['method'] and t['weights'] == r['weights']
                   and all(float(t[k]) == float(p.swept[k]) for k in keys)]
            assert len(hit) == 1, (p.label(), r['method'], r['weights'], hit)
            assert p.run_id in hit[0]['run_ids'].split()
            if r['method'] == 'teacher': assert math.isclose(float(hit[0]['ppl']), r['ppl'], rel_tol=1e-12)   # mean of equal values
            else: assert float(hit[0]['ppl']) == r['ppl'] and float(hit[0]['ppl_sd']) == 0.0 and hit[0]['n'] == '1'
            seen += 1
    assert seen == len(table) + sum(int(t['n']) - 1 for t in table)          # nothing in the table that is not in a point


# ---------------------------------------------------------------------------------------------------------------------
# Unit rules
# ---------------------------------------------------------------------------------------------------------------------

def test_grid_product_zip_exclusions_seeds():
    g = expand_grid({'product': {'lam': [0.2, 0.5], 'tau': [1, 4]}, 'zip': [{'weights': ['int4-g128', 'int2-g64'], 'lr': [1e-4, 3e-4]}],
                     'exclude': [{'lam': 0.5, 'weights': 'int2-g64'}, {'tau': 4, 'lam': 0.2, 'weights': 'int4-g128'}], 'seeds': [0, 7]})
    full = [dict(lam=l, tau=t, weights=w, lr=r, seed=s) for l in (0.2, 0.5) for t in (1, 4) for w, r in (('int4-g128', 1e-4), ('int2-g64', 3e-4))
            for s in (0, 7)]
    want = [p for p in full if not (p['lam'] == 0.5 and p['weights'] == 'int2-g64') and not (p['tau'] == 4 and p['lam'] == 0.2 and p['weights'] == 'int4-g128')]
    assert g == want and len(g) == 2 * (8 - 2 - 1)
    assert expand_grid({'seeds': 3}) == [{'seed': 0}, {'seed': 1}, {'seed': 2}]
    for bad, msg in (({'zip': {'a': [1, 2], 'b': [3]}}, 'same length'), ({'product': {'a': [1]}, 'exclude': [{'a': 2}]}, 'matches no point'),
                     ({'product': {'a': [1]}, 'exclude': [{'z': 2}]}, 'not a grid key'), ({'product': {'a': 1}}, 'non-empty list'),
                     ({'seeds': [0, 0]}, 'distinct'), ({'product': {'a': [1]}, 'zip': {'a': [1]}}, 'given twice'),
                     ({'product': {'a': [1]}, 'exclude': [{'a': 1}]}, 'no point left'), ({'grid': {}}, "unknown key 'grid'")):
        with pytest.raises(ValueError, match=re.escape(msg)): expand_grid(bad)


def test_shipped_sweep_files_load_and_the_smollm2_ablation_changes_one_ingredient_per_point(tmp_path, monkeypatch):
    "Every sweep file under nbs/experiments/sweeps passes `load_sweep`'s checks; each ablation point differs from the study's defaults in exactly one ingredient."
    monkeypatch.chdir(tmp_path)                       # load_sweep writes nothing; its runs/ folder resolves here
    files = sorted(f for f in (REPO/'nbs'/'experiments'/'sweeps').glob('*.yaml') if 'grid' in yaml.safe_load(f.read_text()))
    assert {f.name for f in files} >= {'ablation-embedded.yaml', 'ablation-smollm2.yaml', 'quickstart.yaml', 'seeds-hparams.yaml'}
    sweeps = {f.stem: load_sweep(f) for f in files}
    defaults = notebook_parameters(REPO/'nbs'/'experiments'/'compare.ipynb')
    ingredients = ('init', 'trainable', 'blockwise', 'loss')
    pts = sweeps['ablation-smollm2'].points
    changed = [[k for k in ingredients if p.params[k] != defaults[k]] for p in pts]
    assert all(len(c) == 1 for c in changed), changed
    assert {k for c in changed for k in c} == set(ingredients)    # every ingredient is varied at least once
    assert all(p.params['seeds'] == [0, 1] and p.params['teacher'] == defaults['teacher'] and p.params.get('steps', defaults['steps']) == defaults['steps'] for p in pts)


def test_run_ids_are_stable_hashes_of_the_parameters(tmp_path):
    import hashlib
    p = {'weights': ['int4-g128'], 'tau': 2.0, 'teacher': 'embedded'}
    want = hashlib.sha256(json.dumps({'source': 'compare.ipynb', 'params': p}, sort_keys=True, separators=(',', ':')).encode()).hexdigest()[:12]
    assert run_id('compare.ipynb', p) == want == run_id('compare.ipynb', dict(reversed(list(p.items()))))
    # the same points written in another order, with ints for floats and scalars for one-element lists, get the same ids
    a = tmp_path/'a.yaml'; a.write_text('params: {teacher: embedded}\ngrid: {product: {tau: [2, 4], weights: [int4-g128]}}\n')
    b = tmp_path/'b.yaml'; b.write_text('params: {teacher: embedded}\ngrid: {product: {weights: [[int4-g128]], tau: [4.0, 2.0]}}\n')
    ia, ib = [p.run_id for p in load_sweep(a).points], [p.run_id for p in load_sweep(b).points]
    assert sorted(ia) == sorted(ib) and len(set(ia)) == 2 and ia[0] == run_id('compare.ipynb', p)
    assert load_sweep(a).points[0].folder == (Path('runs')/'a'/ia[0]).resolve()


@pytest.mark.parametrize('text, msg', [
    ('grid: {product: {temperature: [1, 2]}}', "grid: unknown parameter 'temperature'"),
    ('params: {stepz: 3}', "params: unknown parameter 'stepz'"),
    ('params: {out: elsewhere}', "'out' is set by the sweep"),
    ('grid: {product: {tau: [2, 0]}}', 'grid value tau=0: tau: must be a finite number > 0 and <= 100'),
    ('params: {lr: auto}', "params: lr: must be a finite number > 0, got 'auto'"),       # only tau takes 'auto'
    ('grid: {product: {weights: [int4-g128, int8-token]}}', 'grid value weights=int8-token'),
    ('grid: {product: {methods: [[rtn], [rtn, lsq]]}}', "unknown method(s) ['lsq']"),
    ('params: {eval_tokens: 100}', 'params: eval_tokens: must be an integer >= 2048'),
    ('grid: {product: {steps: [10, 2.5]}}', 'steps must be a int'),
    ('params: {lam: 0.9, gamma: 0.3}\ngrid: {product: {lam: [0.5]}}', "'lam' is both a fixed parameter"),
    ('params: {seeds: [0, 1]}\ngrid: {seeds: 2}', 'params.seeds and grid.seeds'),
    ('notebook: nothere.ipynb', "notebook 'nothere.ipynb' not found"),
    ('executor: {slurm: {partiton: gpu}}', "unknown key 'partiton' in executor.slurm"),
    ('executor: {slurm: {gpus: 2}}', 'more than one GPU or process per point needs a trainer sweep'),
    ('grid: {product: {tau: [1, 1.0]}}', 'are the same run'),
    ('grids: {}', "unknown key 'grids'"),
])
def test_refusals_name_the_key_before_anything_is_written(tmp_path, monkeypatch, capsys, text, msg):
    monkeypatch.chdir(tmp_path)
    (tmp_path/'s.yaml').write_text(text + '\n')
    with pytest.raises(ValueError, match=re.escape(msg)): load_sweep(tmp_path/'s.yaml')
    assert main(['sweep', 's.yaml']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('kdq-bench: error: ') and msg in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['s.yaml']                     # nothing written


def test_foreign_folders_are_never_touched(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path/'s.yaml').write_text('params: {teacher: embedded}\ngrid: {product: {tau: [1, 2]}}\n')
    (tmp_path/'runs'/'s').mkdir(parents=True)
    (tmp_path/'runs'/'s'/'notes.txt').write_text('mine')
    assert main(['sweep', 's.yaml']) == 2
    assert 'not created by kdq-bench sweep' in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path/'runs'/'s').iterdir()) == ['notes.txt']
    assert main(['sweep', 's.yaml', '--dry-run']) == 0                       # the plan reads, never writes
    out = capsys.readouterr().out
    assert out.count('| submit |') == 2 and 'would submit at most 2 point(s) to 1 local worker' in out


# ---------------------------------------------------------------------------------------------------------------------
# Any notebook: retries, reruns and a sweep that outlives its driver (a toy notebook, no torch in the kernel)
# ---------------------------------------------------------------------------------------------------------------------

TOY = """import json, pathlib, time
while gate and not pathlib.Path(gate).exists(): time.sleep(0.1)
flag = pathlib.Path(out, 'tried')
if x == fail_once and not flag.exists():
    flag.write_text('1')
    raise RuntimeError('the first attempt fails')
pathlib.Path(out, 'metrics.json').write_text(json.dumps({'value': 10 * x + seed}))"""

def toy_sweep(tmp_path, **sweep) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1\nseed = 0\nfail_once = 0\ngate = ''\nout = '.'"), nbformat.v4.new_code_cell(TOY)]
    nb.cells[0].metadata['tags'] = ['parameters']
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nbformat.write(nb, tmp_path/'toy.ipynb')
    (tmp_path/'toy.yaml').write_text(yaml.safe_dump({'notebook': 'toy.ipynb', 'executor': {'workers': 2, 'poll': 0.2}, **sweep}))
    return tmp_path/'toy.yaml'

def test_failed_point_alone_rerun_and_retries(tmp_path, monkeypatch, capsys):
    "A point whose notebook raises fails alone; the next run reruns just it; --retries resubmits it within the run."
    from kdq_bench.sweeps import sweep_command
    monkeypatch.chdir(tmp_path)
    f = toy_sweep(tmp_path, params={'fail_once': 2}, grid={'product': {'x': [1, 2, 3]}})
    assert sweep_command(f) == 1
    err = capsys.readouterr().err
    pts = load_sweep(f).points
    assert [read_status(p.folder)['state'] for p in pts] == ['done', 'failed', 'done']
    assert 'RuntimeError: the first attempt fails' in read_status(pts[1].folder)['error'] and f"FAILED {pts[1].run_id}" in err
    assert 'the first attempt fails' in (pts[1].folder/'log.txt').read_text()        # the traceback is in the point's log
    assert [r['status'] for r in read_csv(tmp_path/'runs'/'toy'/'sweep.csv')] == ['done', 'done', 'failed']
    done = {p.run_id: (p.folder/'metrics.json').read_bytes() for p in pts if p is not pts[1]}
    assert sweep_command(f, dry_run=True) == 0
    assert capsys.readouterr().out.count('| skip |') == 2
    assert sweep_command(f) == 0                                                       # reruns only the failed point
    err = capsys.readouterr().err
    assert err.count('[sweep] started') == 1 and f"started {pts[1].run_id}" in err
    assert {p.run_id: (p.folder/'metrics.json').read_bytes() for p in pts if p is not pts[1]} == done
    assert [float(r['value']) for r in read_csv(tmp_path/'runs'/'toy'/'sweep.csv')] == [10.0, 20.0, 30.0]
    # within one run: --retries 1 resubmits the failed point at once
    g = toy_sweep(tmp_path, name='retry', params={'fail_once': 1}, grid={'product': {'x': [1, 4]}, 'seeds': [3]})
    assert sweep_command(g, retries=1) == 0
    err = capsys.readouterr().err
    (p1, p4) = load_sweep(g).points
    assert 'retry 1/1: resubmitting 1 failed point(s)' in err and err.count('[sweep] started') == 3
    assert (read_status(p1.folder)['attempt'], read_status(p4.folder)['attempt']) == (2, 1)
    assert [float(r['value']) for r in read_csv(tmp_path/'runs'/'retry'/'sweep.csv')] == [13.0, 43.0]
    assert sweep_command(g, collect_only=True) == 0 and '| 4 | 1 | 3 |' in capsys.readouterr().out


def test_points_outlive_their_driver_and_are_watched_not_resubmitted(tmp_path, monkeypatch):
    "The sweep process dies (closed laptop); its point keeps running; the next invocation watches it instead of starting it twice."
    f = toy_sweep(tmp_path, params={'gate': str(tmp_path/'go')}, grid={'product': {'x': [5]}})   # the point waits for 'go'
    drv = [sys.executable, '-c', 'import sys; from kdq_bench.sweeps import sweep_command; sys.exit(sweep_command(sys.argv[1]))', str(f)]
    first = subprocess.Popen(drv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    monkeypatch.chdir(tmp_path)
    (p,) = load_sweep(f).points
    log = open(tmp_path/'second.log', 'w')
    second = None
    try:
        wait_for(lambda: read_status(p.folder)['state'] == 'running', 'the point to run', proc=first)
        first.kill(); first.wait()                                        # the driver only: the point has its own session
        second = subprocess.Popen(drv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: 'watching' in (tmp_path/'second.log').read_text(), 'the second run to watch the point', proc=second)
        (tmp_path/'go').touch()
        assert second.wait(timeout=120) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None: proc.kill()
        log.close()
    err = (tmp_path/'second.log').read_text()
    assert f"watching {p.run_id}" in err and '[sweep] started' not in err and '1 still running, 0 to run' in err, err
    st = read_status(p.folder)
    assert st['state'] == 'done' and st['attempt'] == 1
    assert (p.folder/'log.txt').read_text().count('== attempt') == 1


# ---------------------------------------------------------------------------------------------------------------------
# A 2×2 study sweep on a real Slurm cluster
# ---------------------------------------------------------------------------------------------------------------------

class Background:
    "`fn(*args)` in a thread, with the `poll`/`wait` of a process (the sweep runs in-process: torch is already imported)."
    def __init__(self, fn, *args):
        self.rc = None
        def body():
            try: self.rc = fn(*args)
            except BaseException as e: self.rc = e
        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()
    def poll(self): return None if self.thread.is_alive() else self.rc
    def wait(self, timeout=None):
        self.thread.join(timeout)
        if self.thread.is_alive(): raise TimeoutError('the sweep is still running')
        return self.rc

def test_slurm_sweep_requeue_cancel_and_rerun(slurm, tiny_teacher, tmp_path, monkeypatch, capsys):
    "steps × weights through one sbatch job array; a preempted point is requeued and resumes; a cancelled one fails alone and reruns alone."
    f = sweep_file(tmp_path/'grid.yaml', tiny_teacher.path, out=str(tmp_path/'runs'),
                   grid={'product': {'steps': [10, 120], 'weights': ['int4-g128', 'int3-g128']}},
                   executor={'poll': 0.5, 'slurm': {'time': 20, 'cpus': 1, 'array_parallelism': 2}})
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(f)
    preempted, cancelled = sweep.points[2:]                            # the two long points
    proc = Background(main, ['sweep', str(f), '--executor', 'slurm'])
    try:
        # preemption: USR2 (what Slurm sends before the time limit or on preemption) once the trained row has a checkpoint
        ck = wait_for(lambda: checkpoint_of(preempted), 'a checkpoint of the first long point', proc=proc)
        kept = [l for l in curve_lines(preempted) if json.loads(l)['step'] <= int(ck.name.split('-')[1])]
        job = read_status(preempted.folder)['job_id']
        slurm.run('scancel', '--signal=USR2', job)
        # Slurm holds a requeued job for about two minutes (reason BeginTime); release it so the test does not wait
        wait_for(lambda: slurm.run('squeue', '-h', '-j', job, '-o', '%r').stdout.strip() == 'BeginTime', 'the requeued job to wait', proc=proc)
        slurm.run('scontrol', 'update', f'JobId={job}', 'StartTime=now')
        # cancellation: scancel the other long point as soon as its job runs
        wait_for(lambda: read_status(cancelled.folder)['state'] == 'running', 'the second long point to run', proc=proc)
        victim = read_status(cancelled.folder)['job_id']
        slurm.run('scancel', victim)
    finally:
        rc = proc.wait(timeout=600)
    assert rc == 1                                                      # one point not done
    first = capsys.readouterr().err
    st = {p.run_id: read_status(p.folder) for p in sweep.points}
    assert [st[p.run_id]['state'] for p in sweep.points] == ['done', 'done', 'done', 'failed'], first
    assert re.search('CANCELLED|SIGTERM', st[cancelled.run_id]['error']) and st[cancelled.run_id]['attempt'] == 1, st[cancelled.run_id]
    # the preempted point was requeued by submitit (same job, same attempt) and resumed its training from the checkpoint
    assert st[preempted.run_id]['requeues'] == 1 and st[preempted.run_id]['job_id'] == job and st[preempted.run_id]['attempt'] == 1
    assert curve_lines(preempted)[:len(kept)] == kept and len(curve_lines(preempted)) == 120
    assert (preempted.folder/'log.txt').read_text().count('== attempt 1 as job') == 2
    # the point is recorded done just before its job's process exits: give Slurm a moment to account it
    wait_for(lambda: slurm.states()[job] == 'COMPLETED' and slurm.states()[victim] == 'CANCELLED', 'Slurm to account the two jobs', timeout=60)
    assert f"FAILED {cancelled.run_id}" in first and first.count('[sweep] submitted') == 4 and f"log runs/grid/{cancelled.run_id}/log.txt" in first
    # the collected table: every done point's rows, the failed point listed
    check_table_against_points(dataclasses.replace(sweep, points=sweep.points[:3]))
    failed = [r for r in read_csv(sweep.folder/'sweep.csv') if r['status'] == 'failed']
    assert [r['run_ids'] for r in failed] == [cancelled.run_id] and failed[0]['error'] == st[cancelled.run_id]['error']
    md = (sweep.folder/'sweep.md').read_text()
    assert 'Points not done' in md and cancelled.run_id in md and 'plotly' in (sweep.folder/'report.html').read_text()
    # the next invocation reruns just the failed point and never redoes a done one
    before = {p.run_id: (p.folder/'metrics.json').read_bytes() for p in sweep.points[:3]}
    assert main(['sweep', str(f), '--executor', 'slurm']) == 0
    err = capsys.readouterr().err
    assert err.count('[sweep] submitted') == 1 and f"submitted {cancelled.run_id}" in err and '3 done' in err
    assert {p.run_id: (p.folder/'metrics.json').read_bytes() for p in sweep.points[:3]} == before
    st = read_status(cancelled.folder)
    assert st['state'] == 'done' and st['attempt'] == 2
    check_table_against_points(sweep)
    assert 'Points not done' not in (sweep.folder/'sweep.md').read_text()


# ---------------------------------------------------------------------------------------------------------------------
# The documented local sweep
# ---------------------------------------------------------------------------------------------------------------------

def documented_command() -> str:
    "The one command of the 'Run on a cluster' page that runs the quickstart sweep locally."
    nb = nbformat.read(PAGE, as_version=4)
    cmds = re.findall(r'^\s*(kdq-bench sweep nbs/experiments/sweeps/quickstart\.yaml[^\n`]*)$', '\n'.join(c.source for c in nb.cells), re.M)
    assert cmds, 'the page shows no quickstart command'
    return cmds[0].strip()

def test_documented_local_sweep_kill_and_rerun(tiny_teacher, tmp_path, monkeypatch, capsys):
    "The page's command on the tiny teacher: the table and the report; a killed point fails alone and reruns alone."
    cmd = documented_command()
    (tmp_path/'nbs'/'experiments'/'sweeps').mkdir(parents=True)
    sweep_file(tmp_path/'nbs'/'experiments'/'sweeps'/'quickstart.yaml', tiny_teacher.path)   # the documented file, the tiny teacher
    argv = [str(Path(sys.executable).parent/'kdq-bench')] + cmd.split()[1:]
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep('nbs/experiments/sweeps/quickstart.yaml')
    victim = sweep.points[1]
    log = open(tmp_path/'first.log', 'w')
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        pid = wait_for(lambda: read_status(victim.folder).get('state') == 'running' and read_status(victim.folder)['pid'], 'the second point to run', proc=proc)
        os.killpg(pid, signal.SIGKILL)                                   # the point's process and its kernel
        assert proc.wait(timeout=300) == 1
    finally:
        if proc.poll() is None: proc.kill()
        log.close()
    first = (tmp_path/'first.log').read_text()
    assert [read_status(p.folder)['state'] for p in sweep.points] == ['done', 'failed', 'done', 'done'], first
    assert 'SIGKILL' in read_status(victim.folder)['error']
    assert f"FAILED {victim.run_id}" in first and first.count('[sweep] started') == 4
    assert sweep.folder == tmp_path/'runs'/'quickstart'
    before = {p.run_id: (p.folder/'metrics.json').read_bytes() for p in sweep.points if p is not victim}
    assert main(cmd.split()[1:]) == 0                                    # the same command again (in-process)
    r = capsys.readouterr()
    assert r.err.count('[sweep] started') == 1 and f"started {victim.run_id}" in r.err
    assert {p.run_id: (p.folder/'metrics.json').read_bytes() for p in sweep.points if p is not victim} == before
    assert read_status(victim.folder)['attempt'] == 2
    check_table_against_points(sweep)
    for name in ('sweep.csv', 'sweep.md', 'report.html', 'rows.csv'): assert (sweep.folder/name).stat().st_size > 0
    assert r.out.count('| kd+qat |') == 4 and 'results:' in r.out
    for p in sweep.points:                                               # each point's folder: everything the issue lists
        assert {MARKER, 'params.yaml', 'compare.ipynb', 'metrics.json', 'log.txt', 'status.json'} <= {x.name for x in p.folder.iterdir()}
        assert yaml.safe_load((p.folder/'params.yaml').read_text())['out'] == str(p.folder)


# ---------------------------------------------------------------------------------------------------------------------
# A trainer point under torchrun
# ---------------------------------------------------------------------------------------------------------------------

def test_trainer_point_runs_under_torchrun(tiny_teacher, tmp_path, monkeypatch):
    "A trainer sweep with nproc 2: the point runs `torchrun --nproc_per_node=2 -m kdq_bench.trainer` (FSDP2 over gloo on CPU)."
    base = {'training': dict(method='kd+qat', teacher=str(tiny_teacher.path), corpus='shakespeare', steps=4, batch_size=4, seq_len=32,
                             device='cpu', eval_every=4, eval_tokens=512),
            'quantization': dict(weights='int4-g16'), 'distillation': dict(check_soft_targets='off'), 'optimizer': dict(lr=1e-3)}
    (tmp_path/'base.yaml').write_text(yaml.safe_dump(base))
    (tmp_path/'t.yaml').write_text(yaml.safe_dump({'trainer': 'base.yaml', 'out': str(tmp_path/'runs'),
        'grid': {'product': {'distillation.temperature': [2.0]}}, 'executor': {'nproc': 2, 'poll': 0.5}}))
    monkeypatch.chdir(tmp_path)
    assert main(['sweep', 't.yaml']) == 0
    (p,) = load_sweep('t.yaml').points
    assert read_status(p.folder)['state'] == 'done'
    assert '$ ' + ' '.join(trainer_command(p.folder/'train.yaml', 2)) in (p.folder/'log.txt').read_text()
    state = json.loads((list_checkpoints(p.folder)[-1]/'trainer_state.json').read_text())
    assert state['world_size'] == 2 and state['step'] == 4
    assert yaml.safe_load((p.folder/'config.yaml').read_text())['distillation']['temperature'] == 2.0
    rows = read_csv(p.folder.parent/'sweep.csv')
    last = [json.loads(l) for l in (p.folder/'metrics.jsonl').read_text().splitlines()][-1]
    assert len(rows) == 1 and float(rows[0]['ppl']) == last['val_ppl'] and rows[0]['method'] == 'kd+qat'
