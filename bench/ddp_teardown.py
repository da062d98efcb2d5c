#!/usr/bin/env python
"""Does a two-rank gloo job end cleanly? `python bench/ddp_teardown.py` -> bench/ddp_teardown_results.json

Each run is `torchrun --standalone --nproc_per_node=2` of a tiny DDP job: a Linear layer wrapped in
DistributedDataParallel, one backward pass, a barrier, then the end of the job in one of two ways:

  left_to_shutdown  the process group is destroyed and the DDP wrapper is left for the interpreter's shutdown to
                    free (before Trainer.close, a trainer in a reference cycle: --compile, or the tests' probe);
  trainer_close     agenb's own `Trainer.close` on a stand-in trainer holding the same wrapper: the process group is
                    destroyed, then the wrapper freed and collected while Python is still alive.

`--job plain` runs the same steps without importing agenb (its `Trainer.close` written out in one line): the
interpreter's shutdown is then shorter, and the race shows more often.

The wrapper holds the process group, and gloo's worker threads live as long as the group object. Freed only at
shutdown, they likely touch Python objects after Python has gone (not shown directly); the rank then dies with
SIGABRT ("terminate called without an active exception") although the job did all its work. It shows on a loaded
machine, as in CI, where two pytest workers share 2 cores: `--burners N` busy-loop processes load the CPU while the
runs go. The variants are interleaved (A, B, A, B, ...), so a busy patch of the machine hits both alike.

Per variant: runs, aborted runs (exit code -6 or "terminate called" on stderr), other failures (a timeout, another
error), the abort rate with its exact 95% interval, and Fisher's exact test of aborted against clean runs between
the two variants (other failures left out of it).
"""
from __future__ import annotations
import argparse, json, os, platform, signal, subprocess, sys, tempfile, time
from pathlib import Path

import torch
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from agenb import __version__                  # noqa: E402
from agenb.core import atomic_write_json, git_info   # noqa: E402
from bench.run import dirty_files, refuse     # noqa: E402

WORKER = '''
import gc, sys, types, torch, torch.distributed as dist
from torch import nn
if sys.argv[2] == 'agenb':
    from agenb.trainer import Dist, Trainer
    d = Dist('cpu')
else:   # the same steps without importing agenb (a shorter shutdown: the race shows more often)
    import torch.distributed.nn   # as agenb.trainer does: before the group, or its functions keep the group alive
    dist.init_process_group('gloo')
    d = types.SimpleNamespace(barrier=dist.barrier, close=dist.destroy_process_group)
    class Trainer:
        def close(t): t.d.close(); t.net = t.model; gc.collect()
model = nn.Linear(10, 1)
t = types.SimpleNamespace(d=d, model=model, net=nn.parallel.DistributedDataParallel(model))   # the wrapper's one holder
t.net(torch.randn(4, 10)).sum().backward()
d.barrier()
if sys.argv[1] == 'trainer_close': Trainer.close(t)
else: d.close()
'''
VARIANTS = ('left_to_shutdown', 'trainer_close')


def one_run(script: Path, variant: str, job: str, timeout: float) -> str:
    "'ok', 'aborted' or 'failed' for one two-rank launch."
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
                          variant, job], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                         start_new_session=True)   # its own process group: a timeout kills torchrun and its workers
    try: _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); p.communicate()
        return 'failed'
    if p.returncode == 0: return 'ok'
    return 'aborted' if 'terminate called' in err or 'exitcode  : -6' in err else 'failed'


def summary(outcomes: list[str]) -> dict:
    n, k = len(outcomes), outcomes.count('aborted')
    ci = stats.binomtest(k, n).proportion_ci(0.95, method='exact')
    return {'runs': n, 'aborted': k, 'failed_otherwise': outcomes.count('failed'), 'abort_rate': k / n,
            'abort_rate_95ci': [ci.low, ci.high]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=60, help='launches per variant (default 60)')
    ap.add_argument('--burners', type=int, default=3, help='busy-loop processes that load the CPU meanwhile (default 3)')
    ap.add_argument('--job', choices=('agenb', 'plain'), default='agenb',
                    help="agenb: the job uses agenb's Dist and Trainer.close (default); plain: the same steps in plain torch")
    ap.add_argument('--timeout', type=float, default=120, help='seconds one launch may take (default 120)')
    ap.add_argument('--out', type=Path, default=ROOT / 'bench' / 'ddp_teardown_results.json')
    a = ap.parse_args(argv)
    if a.runs < 1 or a.burners < 0 or not a.timeout > 0:
        refuse(f'--runs must be at least 1, --burners at least 0 and --timeout above 0 (got {a.runs}, {a.burners}, {a.timeout})')
    state, t0 = {'version': __version__, **git_info(ROOT), 'dirty_files': dirty_files()}, time.time()   # before anything runs
    outcomes = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / 'ddp_job.py'; script.write_text(WORKER)
        burners = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(a.burners)]
        try:
            for i in range(a.runs):
                for v in VARIANTS: outcomes[v].append(one_run(script, v, a.job, a.timeout))
                print(f'{i + 1}/{a.runs}: ' + ', '.join(f'{v} {outcomes[v].count("aborted")} aborted' for v in VARIANTS),
                      file=sys.stderr, flush=True)
        finally:
            for b in burners: b.kill()
    res = {v: summary(o) for v, o in outcomes.items()}
    table = [[outcomes[v].count('aborted'), outcomes[v].count('ok')] for v in VARIANTS]
    out = {'agenb': state, 'command': 'python bench/ddp_teardown.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
           'machine': {'cpus': os.cpu_count(), 'platform': platform.platform(), 'python': platform.python_version(),
                       'torch': torch.__version__},
           'burners': a.burners, 'job': a.job, 'variants': res,
           'fisher_exact_p': float(stats.fisher_exact(table).pvalue), 'seconds': round(time.time() - t0, 1)}
    atomic_write_json(a.out, out)
    print(json.dumps(res, indent=2)); print(f'wrote {a.out}')


if __name__ == '__main__':
    main()
