"""Benchmarks of agenb.experiment; writes bench/experiment_results.json.

1. Engine overhead: the same fold jobs (1 variant x 3 folds x 2 seeds, tiny 1-epoch runs on the test preset) run
   once through papermill (nbs/train.ipynb) and once through the CLI (python -m agenb.train), one worker, one job
   at a time. Per-job overhead = papermill job seconds - CLI job seconds, paired by job, and as a ratio of the
   CLI job (a short job: its time is mostly start-up, so the ratio is an upper bound for real jobs).
2. Fold ensemble against a single model on the bench preset (400 subjects, 480x512 images): a 1-variant x 3-fold
   experiment, then `final`: the single model trained on all development subjects and the mean of the 3 fold
   models, both on the test subjects, with bootstrap CIs over test subjects and the paired difference.

Usage: python bench/experiment_bench.py [--preset bench|demo] [--out bench/experiment_results.json]
Runtime on 2 CPU cores: about 8-10 minutes (part 2 dominates).
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), PYTHONUNBUFFERED='1')


def sh(*args, timeout=3600):
    t0 = time.time()
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)
    if r.returncode: sys.exit(f'failed ({r.returncode}): {" ".join(map(str, args))}\n{r.stderr[-3000:]}')
    return r, time.time() - t0


def spec(path, root, name, base, **kw):
    s = {'name': name, 'data': {'image_dir': str(root / 'TA' / 'Healthy' / 'Images'), 'excel_path': str(root / 'TA' / 'characteristics.xlsx')},
         'base': base, 'folds': 3, 'seeds': [1], 'test_size': 0.2, 'split_seed': 42, 'report': False, **kw}
    Path(path).write_text(yaml.safe_dump(s, sort_keys=False))
    return path


def jobs(exp):
    return {r['key']: r for r in (json.loads(p.read_text()) for p in (exp / 'jobs').glob('*.json'))}


def engine_overhead(tmp):
    root = tmp / 'test_data'
    sh('-m', 'agenb.synth', root, '--preset', 'test')
    base = {'arch': 'resnet18', 'pretrained': False, 'image_size': 32, 'epochs': 1, 'batch_size': 16, 'num_workers': 1,
            'warmup_epochs': 0, 'lr': 1.0e-3, 'report': False, 'gradcam_n': 0}
    out, wall = {}, {}
    for engine in ('cli', 'papermill'):
        s = spec(tmp / f'{engine}.yaml', root, f'overhead-{engine}', base, grid={'loss': ['mae']}, seeds=[1, 2])
        _, wall[engine] = sh('-m', 'agenb.experiment', 'run', s, '--out', tmp / f'exp_{engine}', '--engine', engine)
        out[engine] = {k: r['attempts'][0]['seconds'] for k, r in jobs(tmp / f'exp_{engine}').items()}
    keys = sorted(out['cli'])
    diff = [out['papermill'][k] - out['cli'][k] for k in keys]
    cli, pm = [out['cli'][k] for k in keys], [out['papermill'][k] for k in keys]
    return {'jobs': len(keys), 'job': 'resnet18, 32 px, 1 epoch, 14 training subjects (test preset): a short job',
            'cli_job_seconds': {'mean': statistics.mean(cli), 'sd': statistics.stdev(cli)},
            'papermill_job_seconds': {'mean': statistics.mean(pm), 'sd': statistics.stdev(pm)},
            'overhead_seconds_per_job': {'mean': statistics.mean(diff), 'sd': statistics.stdev(diff), 'min': min(diff), 'max': max(diff)},
            'overhead_ratio_of_cli_job': statistics.mean(diff) / statistics.mean(cli),
            'experiment_wall_seconds': wall, 'per_job': {k: {'cli': out['cli'][k], 'papermill': out['papermill'][k]} for k in keys}}


def ensemble_vs_single(tmp, preset):
    root = tmp / f'{preset}_data'
    _, gen = sh('-m', 'agenb.synth', root, '--preset', preset)
    meta = json.loads((root / 'synth_meta.json').read_text())
    base = {'arch': 'resnet18', 'pretrained': False, 'image_size': 64, 'epochs': 12, 'batch_size': 32, 'lr': 1.0e-3,
            'warmup_epochs': 1, 'report': False, 'gradcam_n': 0, 'num_workers': 2}
    s = spec(tmp / 'ens.yaml', root, 'ensemble', base)
    exp = tmp / 'exp_ensemble'
    _, t_run = sh('-m', 'agenb.experiment', 'run', s, '--out', exp, '--engine', 'cli')
    _, t_final = sh('-m', 'agenb.experiment', 'final', exp, '--variant', 'base', '--engine', 'cli')
    e = json.loads((exp / 'experiment.json').read_text())
    board = __import__('pandas').read_csv(exp / 'leaderboard.csv')
    f = e['finals']['base']
    return {'preset': preset, 'oracle_mae': meta['oracle']['TA']['mae'], 'generate_seconds': gen,
            'protocol': {k: e['protocol'][k] for k in ('n_subjects', 'n_test_subjects', 'n_development_subjects', 'folds')},
            'settings': base, 'oof_subject_mae': float(board.subject_mae[0]),
            'oof_subject_mae_ci': [float(board.subject_mae_ci_low[0]), float(board.subject_mae_ci_high[0])],
            'single_model_test_subject_mae': f['single'][0]['test_subject_mae'],
            'single_model_test_subject_mae_ci': f['single'][0]['test_subject_mae_ci'],
            'fold_ensemble_test_subject_mae': f['ensemble']['test_subject_mae'],
            'fold_ensemble_test_subject_mae_ci': f['ensemble']['test_subject_mae_ci'],
            'fold_ensemble_models': f['ensemble']['n_models'],
            'ensemble_minus_single_per_subject': f['ensemble_vs_single'],   # agenb.stats.paired_difference
            'run_seconds': t_run, 'final_seconds': t_final}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--preset', default='bench', choices=('bench', 'demo', 'test'))
    ap.add_argument('--out', default=str(ROOT / 'bench' / 'experiment_results.json'))
    a = ap.parse_args()
    t0 = time.time()
    import torch
    with tempfile.TemporaryDirectory(prefix='agenb_exp_bench_') as tmp:
        tmp = Path(tmp)
        res = {'when': time.strftime('%Y-%m-%d %H:%M'), 'cpus': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
               'cuda': torch.cuda.is_available()}
        res['engine_overhead'] = engine_overhead(tmp)
        print(json.dumps(res['engine_overhead'], indent=1)[:1200], flush=True)
        res['ensemble_vs_single'] = ensemble_vs_single(tmp, a.preset)
        res['seconds'] = round(time.time() - t0, 1)
    Path(a.out).write_text(json.dumps(res, indent=2) + '\n')
    o, en = res['engine_overhead'], res['ensemble_vs_single']
    print(f'papermill overhead per job: {o["overhead_seconds_per_job"]["mean"]:.1f} s (sd {o["overhead_seconds_per_job"]["sd"]:.1f}), '
          f'{o["overhead_ratio_of_cli_job"]:.2f}x a short CLI job of {o["cli_job_seconds"]["mean"]:.1f} s')
    print(f'{en["preset"]} preset: single model test subject MAE {en["single_model_test_subject_mae"]:.2f} '
          f'{en["single_model_test_subject_mae_ci"]}, fold ensemble ({en["fold_ensemble_models"]}) '
          f'{en["fold_ensemble_test_subject_mae"]:.2f} {en["fold_ensemble_test_subject_mae_ci"]}, OOF subject MAE '
          f'{en["oof_subject_mae"]:.2f}, oracle {en["oracle_mae"]:.2f}; wrote {a.out} in {res["seconds"] / 60:.1f} min')


if __name__ == '__main__':
    main()
