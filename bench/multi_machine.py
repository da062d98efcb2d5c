#!/usr/bin/env python
"""Experiments across machines: `python bench/multi_machine.py` -> bench/multi_machine_results.json.

  machines    the same grid (3 variants x 2 folds x 1 seed, resnet18 at 32 px, 2 epochs, --engine cli) finished by one
              `run` and by two `run`s with their own folders sharing one PostgreSQL URL (each one worker), wall time
  overhead    what the database costs a job: the claim, the record written when it starts, the record with its
              out-of-fold predictions when it ends, the record read back and the release; median over 200 jobs, on
              the throw-away PostgreSQL server and on SQLite in the experiment folder

On one 2-core machine the "two machines" are two processes on the same cores, so the speed-up is a lower bound of
what two real machines give. Needs the PostgreSQL server binaries (initdb, pg_ctl).
"""
from __future__ import annotations
import json, os, platform, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / 'bench' / 'out'
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]
from agenb.exp_db import ExpDB, default_url            # noqa: E402
from agenb.synth import ensure_synth                   # noqa: E402
from pgserver import new_database, postgres_server    # noqa: E402

BASE = {'arch': 'resnet18', 'pretrained': False, 'image_size': 32, 'epochs': 2, 'batch_size': 16, 'num_workers': 1,
        'warmup_epochs': 0, 'lr': 1.0e-3, 'report': False, 'gradcam_n': 0, 'checkpoint_every': 0}


def spec_file(d, data) -> Path:
    spec = {'name': 'bench-machines', 'data': {'image_dir': str(data / 'TA' / 'Healthy' / 'Images'),
                                               'excel_path': str(data / 'TA' / 'characteristics.xlsx')},
            'base': BASE, 'grid': {'loss': ['mae', 'mse', 'huber']}, 'folds': 2, 'seeds': [1], 'report': False, 'bootstrap': 200}
    p = Path(d) / 'spec.yaml'; p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def machines(url_of, spec, work) -> dict:
    "Wall seconds of the grid on one machine and on two (their own folders, one database each time)."
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    res = {}
    for n in (1, 2):
        url = url_of(f'm{n}')
        t0 = time.time()
        ps = [subprocess.Popen([sys.executable, '-m', 'agenb.experiment', 'run', str(spec), '--out', str(work / f'n{n}_{i}'),
                                '--storage', url, '--engine', 'cli'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL) for i in range(n)]
        codes = [p.wait() for p in ps]
        secs = time.time() - t0
        eid = json.loads((work / f'n{n}_0' / 'experiment.json').read_text())['id']
        recs = ExpDB(url, eid).jobs()
        res[f'{n}_machine'] = {'seconds': round(secs, 1), 'exit_codes': codes, 'jobs': len(recs),
                               'attempts': sum(len(r['attempts']) for r in recs),
                               'jobs_per_folder': pd.Series([r['machine']['folder'][-4:] for r in recs]).value_counts().to_dict()}
    res['speedup'] = round(res['1_machine']['seconds'] / res['2_machine']['seconds'], 2)
    return res


def overhead(url, n=200) -> dict:
    "Median seconds per job of the database work around one job, and of its parts."
    db = ExpDB(url, 'bench-overhead')
    oof = pd.DataFrame({'variant': 'v', 'seed': 1, 'fold': 1, 'subject': [str(i) for i in range(60)], 'file': 'f.png',
                        'age': 40.0, 'prediction': 41.0, 'path': '/data/f.png'})
    parts = {'claim': [], 'record_start': [], 'record_end_with_oof': [], 'read_back': [], 'release': []}
    for i in range(n):
        rec = {'key': f'job{i}', 'status': 'running', 'attempts': [{'n': 1, 'command': ['python', '-m', 'agenb.train'] * 20}]}
        for part, f in (('claim', lambda: db.claim(f'job:job{i}')), ('record_start', lambda: db.put_job(rec)),
                        ('record_end_with_oof', lambda: db.put_job({**rec, 'status': 'completed', 'mae': 1.0}, oof)),
                        ('read_back', lambda: (db.job(f'job{i}'), db.job_oof(f'job{i}'))), ('release', lambda: db.release(f'job:job{i}'))):
            t = time.perf_counter(); f(); parts[part].append(time.perf_counter() - t)
    med = {k: round(statistics.median(v) * 1000, 2) for k, v in parts.items()}
    return {'per_job_ms': round(sum(med.values()), 2), 'parts_ms': med, 'n_jobs': n}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    data = OUT / 'data_machines'
    ensure_synth(data, preset='demo')
    work = Path(tempfile.mkdtemp(prefix='agenb_bench_machines_'))
    with postgres_server() as server:
        res = {'machine': platform.processor() or platform.machine(), 'cpus': os.cpu_count(),
               'grid': '3 variants x 2 folds x 1 seed, resnet18 32 px, 2 epochs, --engine cli, one worker per machine',
               'machines': machines(lambda name: new_database(server, name), spec_file(work, data), work),
               'overhead_postgresql': overhead(new_database(server, 'overhead')),
               'overhead_sqlite': overhead(default_url(work))}
    (ROOT / 'bench' / 'multi_machine_results.json').write_text(json.dumps(res, indent=1) + '\n')
    print(json.dumps(res, indent=1))


if __name__ == '__main__':
    main()
