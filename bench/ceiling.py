#!/usr/bin/env python
"""How much would more people buy? `python bench/ceiling.py` -> bench/ceiling_results.json and a block of bench/README.md.

Issue 27 asks the recipe to beat a plain PyTorch loop at equal data and budget by enough that the upper end of the
95% interval of `mae_over_plain_loop` falls below 1 (a ratio near 0.91 with 80 test subjects), and to come within 1.20
of the oracle. Twenty leaderboards found no setting that beats the recipe, and the recipe is level with the plain loop.
This script asks what more *data* buys the same recipe, as a yardstick for what a better *method* at equal data could be
expected to buy: the recipe (`bench/defaults/augment.yaml`'s `recipe` variant: the budget of the bench's fold ensemble)
is trained on 320, 640, 1280 and 2560 development subjects of another synthetic cohort (generator seed 5, the bench
preset's images; nested: each set holds the smaller ones), 10% of them the validation slice, with 2 training seeds,
and every model predicts the bench's own 80 test subjects (the accuracy and ensemble sections' test images). The
cohort's own 200 held-out subjects are each run's test set, a second, larger test set for the same curve.

Reported per size: the image-level test MAE on the bench's test images (mean over seeds, and per seed), over the
oracle on the same images, and over the 320-subject models (the gain from the data alone), with 95% intervals that
resample the seeds and the test subjects (agenb.stats.boot_means); the same on the cohort's held-out subjects. About 45
minutes on a 2-core CPU (two trainings at a time, one thread each, as the defaults' leaderboards ran).
`--plain-loop` also trains bench/run.py's plain PyTorch loop on the 320- and 2560-subject runs' own splits (same
subjects, seeds and budget) and reports `mae_over_plain_loop` on the held-out subjects at both sizes (about 35 minutes).
`--sizes 320 640` runs some sizes only (then the results go to bench/out/ instead); `--render` only renders the block
again from bench/ceiling_results.json.
"""
from __future__ import annotations
import argparse, hashlib, json, os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from agenb import __version__
from agenb.core import file_sha256, git_info
from agenb.data import load_dataset
from agenb.split import make_split
from agenb.stats import boot_means, percentile_interval
from agenb.synth import ensure_synth

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as B   # bench/run.py: paths, data records, CLI runner, machine record
import render     # bench/render.py: fills the marked blocks of bench/README.md

SIZES = (320, 640, 1280, 2560)   # development subjects (train + validation) per model
HELD_OUT = 200                   # the cohort's own test subjects, the same for every size
VAL_SHARE = 0.1                  # of the development subjects, as `experiment final` holds out for its single models
PLAIN_SIZES = (320, 2560)        # sizes at which --plain-loop also trains the bench's plain loop
SEEDS = (1, 2)                   # the training seeds of the bench's single models (section `ensemble`)
COHORT = dict(preset='bench', subjects=max(SIZES) + HELD_OUT, pathological=0, seed=5)
SPEC, VARIANT = 'bench/defaults/augment.yaml', 'recipe'
RESULTS = HERE / 'ceiling_results.json'
ENV = {'OMP_NUM_THREADS': '1', 'OMP_WAIT_POLICY': 'PASSIVE'}


def recipe_options() -> dict:
    "The trainer options of the spec's recipe variant (its base with the variant's own settings)."
    spec = yaml.safe_load((B.ROOT / SPEC).read_text())
    (v,) = [v for v in spec['variants'] if v['name'] == VARIANT]
    return {**spec['base'], **{k: x for k, x in v.items() if k != 'name'}}


def split_files(cohort_root, out_dir, sizes) -> dict:
    """One subject-level split.csv per size over the whole cohort: the same HELD_OUT test subjects for every size, the
    first `n` of one shuffled order of the others as development subjects (so each set holds the smaller ones), their
    first VAL_SHARE the validation slice, everyone else excluded."""
    subjects = pd.read_csv(Path(cohort_root) / 'synth_latents.csv', dtype={'subject': str}).query("muscle == 'TA'").subject
    order = np.random.default_rng(0).permutation(sorted(subjects.unique(), key=int))
    test, rest = order[:HELD_OUT], order[HELD_OUT:]
    files = {}
    for n in sizes:
        if n > len(rest): B.refuse(f'ceiling: the cohort has {len(rest)} development subjects, fewer than {n}')
        n_val = round(VAL_SHARE * n)
        lab = {**{s: 'excluded' for s in rest[n:]}, **{s: 'val' for s in rest[:n_val]},
               **{s: 'train' for s in rest[n_val:n]}, **{s: 'test' for s in test}}
        files[n] = Path(out_dir) / f'split_{n}.csv'
        pd.DataFrame({'subject': list(lab), 'split': list(lab.values())}).to_csv(files[n], index=False)
    return files


def train_recipe(root, out_dir, name, seed, split_file, changed=None, timeout=4 * 3600):
    """The recipe, with the options `changed`, trained by the trainer CLI on `root` with `split_file` as the ceiling's
    runs are (one thread, deterministic); output in `out_dir`/`name`.log. Returns the run folder and the wall seconds."""
    opts = {**recipe_options(), **(changed or {}), 'seed': seed, 'split_file': split_file, 'deterministic': True, 'num_workers': 1}
    for k in ('pretrained', 'image_dir', 'excel_path'): opts.pop(k, None)
    cmd = [sys.executable] + B.train_cmd(root, out_dir, name, **opts)
    return B.run_cli(cmd, ENV, Path(out_dir) / f'{name}.log', timeout)


def train_and_predict(cohort_root, bench_root, out_dir, n, seed, split_file, from_runs=False, timeout=4 * 3600):
    """One model: trained on `n` development subjects of the cohort, then predicting the bench's TA healthy images.
    A job whose record (`n<N>_s<SEED>.json`) says it finished from the same split at the current commit, with a clean
    tree now, is not trained again; with `from_runs`, any finished record of the same split is kept (and none is an
    error): the results then say which commit trained each run (`run_record`)."""
    record = Path(out_dir) / f'n{n}_s{seed}.json'
    if record.is_file():
        r, now = json.loads(record.read_text()), git_info(B.ROOT)
        if r['split_sha256'] == file_sha256(split_file) and (from_runs or (r['commit'] == now['commit'] and not now['dirty'])):
            print(f'ceiling: n={n} seed={seed}: kept from {B.rel(record)}', flush=True)
            return {**r, 'run_dir': Path(r['run_dir']), 'bench_predictions': Path(r['bench_predictions'])}
    if from_runs: B.refuse(f'ceiling: --from-runs: no finished record {B.rel(record)} of this split; run without --from-runs')
    run_dir, wall = train_recipe(cohort_root, out_dir, f'n{n}_s{seed}', seed, split_file, timeout=timeout)
    pred_csv = Path(out_dir) / f'n{n}_s{seed}_bench.csv'
    p = subprocess.run([sys.executable, '-m', 'agenb.predict', str(run_dir), '--image-dir', str(B.data_paths(bench_root)[0]),
                        '--out', str(pred_csv), '--device', 'cpu'], cwd=B.ROOT, env={**os.environ, **ENV},
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode: raise RuntimeError(f'agenb.predict exited {p.returncode}: {p.stderr.strip()[-500:]}')
    out = {'n': n, 'seed': seed, 'run_dir': run_dir, 'bench_predictions': pred_csv, 'wall_seconds': round(wall, 1)}
    record.write_text(json.dumps({**out, 'run_dir': str(run_dir), 'bench_predictions': str(pred_csv),
                                  'split_sha256': file_sha256(split_file), 'commit': git_info(B.ROOT)['commit']}))
    print(f'ceiling: n={n} seed={seed} done in {render._minutes(wall)}', flush=True)
    return out


def plain_loop_job(run, out_dir, timeout=4 * 3600) -> dict:
    """bench/run.py's plain PyTorch loop on an agenb run's own split (same train, validation and held-out test
    subjects), with its seed, image size, batch, epochs, learning rate and weight decay: its record, predictions
    included. Kept (not trained again) while its record names the same run."""
    record = Path(out_dir) / f'plain_n{run["n"]}_s{run["seed"]}.json'
    kept = json.loads(record.read_text()) if record.is_file() else {}
    if kept.get('agenb_run') == B.rel(run['run_dir']):
        print(f'ceiling: plain loop n={run["n"]} seed={run["seed"]}: kept from {B.rel(record)}', flush=True)
        return kept
    args = json.loads((Path(run['run_dir']) / 'config.json').read_text())['args']
    settings = {k: args[k] for k in ('image_size', 'batch_size', 'epochs', 'lr', 'weight_decay')}
    out = {**B.plain_loop_subprocess(run['run_dir'], settings, timeout, run['seed']), 'settings': settings,
           'agenb_run': B.rel(run['run_dir']), 'n': run['n']}
    record.write_text(json.dumps(out))
    print(f'ceiling: plain loop n={run["n"]} seed={run["seed"]} done in {render._minutes(out["wall_seconds"])}', flush=True)
    return out


def plain_comparison(j, runs, plains, n_boot=2000, boot_seed=0) -> dict:
    """Per size with plain-loop runs: the recipe's and the plain loop's image MAE on the held-out images `j` (mean
    over the seeds, each seed the same split for both), and `mae_over_plain_loop` with its 95% interval as the bench's
    accuracy section computes it (bench/run.py seeds_ratios: each side's seeds resampled, the subjects together)."""
    out = {}
    for n in sorted({p['n'] for p in plains}):
        seeds = sorted(p['seed'] for p in plains if p['n'] == n)
        get = lambda rows, s: next(r for r in rows if r['n'] == n and r['seed'] == s)
        agenb = [j.filename.map(pd.read_csv(Path(get(runs, s)['run_dir']) / 'predictions.csv').set_index('filename').pred) for s in seeds]
        plain = [j.filename.map(pd.Series(get(plains, s)['predictions'])) for s in seeds]
        assert all(x.notna().all() for x in agenb + plain), f'n={n}: a held-out image was not predicted'
        cubes = {'agenb': np.stack([B.subject_error_sums(j, x) for x in agenb]),
                 'plain': np.stack([B.subject_error_sums(j, x) for x in plain])}
        r = B.seeds_ratios(cubes, n_boot, boot_seed)
        mae = lambda x: round(float((x - j.age).abs().mean()), 3)
        out[str(n)] = {'seeds': seeds, 'agenb_test_mae_per_seed': [mae(x) for x in agenb],
                       'plain_test_mae_per_seed': [mae(x) for x in plain],
                       'plain_best_epoch_per_seed': [get(plains, s)['best_epoch'] for s in seeds],
                       'mae_over_plain_loop': r['mae_over_plain_loop'], 'mae_over_plain_loop_ci95': r['mae_over_plain_loop_ci95']}
    return out


OPTION_KEYS = ('arch', 'pretrained', 'image_size', 'epochs', 'batch_size', 'loss', 'lr', 'warmup_epochs', 'brightness',
               'contrast', 'dropout', 'rotation', 'num_workers', 'deterministic')

def run_record(run_dir) -> dict:
    "What a finished run's config.json says it ran: its options (OPTION_KEYS), seed, commit, threads and best epoch."
    c = json.loads((Path(run_dir) / 'config.json').read_text())
    return {'options': {k: c['args'].get(k) for k in OPTION_KEYS}, 'seed': c['args']['seed'], 'git': c['environment']['git'],
            'threads': c['environment']['threads'], 'best_epoch': c.get('best_epoch'), 'status': c.get('status')}


def scored_images(root, subjects) -> pd.DataFrame:
    "filename, subject, age and the generator's oracle of `root`'s healthy TA images of `subjects`, sorted by filename."
    lat = pd.read_csv(Path(root) / 'synth_latents.csv', dtype={'subject': str})
    lat = lat[(lat.muscle == 'TA') & (lat.cohort == 'Healthy') & lat.subject.isin(set(map(str, subjects)))]
    return lat[['filename', 'subject', 'age', 'oracle_pred']].rename(columns={'oracle_pred': 'oracle'}).sort_values('filename').reset_index(drop=True)


def bench_test_subjects(bench_root) -> list:
    "The bench's 80 test subjects: the accuracy section's split of seed 42 (test_size 0.2), drawn as the trainer draws it."
    image_dir, excel = B.data_paths(bench_root)
    table, _ = load_dataset(image_dir, excel)
    split, _ = make_split(table, test_size=0.2, val_size=0.1, seed=42)
    return sorted(table.subject[split == 'test'].astype(str).unique(), key=int)


def curve(j, preds, n_boot=2000, boot_seed=0) -> dict:
    """Per size: image MAE (mean over seeds, per seed), over the oracle and over the smallest size's models, each with
    a 95% interval (agenb.stats.boot_means: seeds resampled per size, test subjects resampled once for all: paired)."""
    sums = lambda pred: B.subject_error_sums(j, pred)
    cubes = {n: np.stack([sums(p) for p in ps]) for n, ps in preds.items()}
    cubes['oracle'] = sums(j.oracle)[None]
    M = dict(zip(cubes, boot_means(cubes, n_boot, boot_seed)))
    point = {k: c.mean(0).sum() for k, c in cubes.items()}
    first = min(preds)
    mae = lambda p: round(float(np.mean(np.abs(np.asarray(p, float) - j.age))), 3)
    rows = {}
    for n, ps in preds.items():
        rows[str(n)] = {'test_mae': round(float(np.mean([mae(p) for p in ps])), 3), 'test_mae_per_seed': [mae(p) for p in ps],
                        'mae_over_oracle': round(float(point[n] / point['oracle']), 3),
                        'mae_over_oracle_ci95': [round(x, 3) for x in percentile_interval(M[n] / M['oracle'])],
                        f'mae_over_{first}': round(float(point[n] / point[first]), 3),
                        f'mae_over_{first}_ci95': [round(x, 3) for x in percentile_interval(M[n] / M[first])]}
    return {'n_images': len(j), 'n_subjects': int(j.subject.nunique()), 'oracle_test_mae': mae(j.oracle), 'sizes': rows,
            'test_filenames_sha256': hashlib.sha256('\n'.join(sorted(j.filename)).encode()).hexdigest(),
            'method': f'{n_boot} bootstrap resamples: each size\'s training seeds drawn with replacement on their own, '
                      f'the {j.subject.nunique()} test subjects drawn once for all (seed {boot_seed}); percentile interval'}


def ceiling_block(res) -> str:
    "bench/README.md's block of the data curve, rendered from ceiling_results.json."
    b, h = res['bench_test'], res['held_out_test']
    first = min(res['sizes'])
    lines = [f'| development subjects | test MAE, bench test images (per seed) | over the oracle [95% CI] | over {first} subjects [95% CI] '
             f'| test MAE, {h["n_subjects"]} held-out subjects of the cohort | over the oracle [95% CI] | over {first} subjects [95% CI] |',
             '|---:|---|---|---|---|---|---|']
    ci = lambda r, k: f'{r[k]:.3f} [{r[k + "_ci95"][0]:.3f}, {r[k + "_ci95"][1]:.3f}]'
    rel = lambda r, n: '(reference)' if n == first else ci(r, f'mae_over_{first}')
    for n in res['sizes']:
        rb, rh = b['sizes'][str(n)], h['sizes'][str(n)]
        lines.append(f'| {n} | {rb["test_mae"]:.2f} ({", ".join(f"{x:.2f}" for x in rb["test_mae_per_seed"])}) | '
                     f'{ci(rb, "mae_over_oracle")} | {rel(rb, n)} | {rh["test_mae"]:.2f} | '
                     f'{ci(rh, "mae_over_oracle")} | {rel(rh, n)} |')
    o, a = res['recipe_options'], res['agenb']
    method = res['method'].replace(f'the {b["n_subjects"]} test subjects',
                                   f'the test subjects ({b["n_subjects"]} of the bench, {h["n_subjects"]} held out)')
    lines += ['', f'The oracle on the same images: {b["oracle_test_mae"]:.2f} years (bench test: {b["n_images"]} images of '
              f'{b["n_subjects"]} subjects) and {h["oracle_test_mae"]:.2f} (held out: {h["n_images"]} images). '
              f'`{res["spec"]}` `{res["variant"]}` ({o["arch"]} from scratch, {o["image_size"]} px, {o["epochs"]} epochs, '
              f'lr {o["lr"]}), training seeds {", ".join(map(str, res["seeds"]))}, {round(100 * res["val_share"])}% of each '
              f'size\'s subjects for validation; cohort: agenb.synth version {res["cohort"]["fingerprint"]["version"]}, seed '
              f'{res["cohort"]["fingerprint"]["seed"]}. {method}. Commit `{a["commit"][:10]}`'
              f'{" with uncommitted changes" if a["dirty"] else " with a clean tree"}, {res["machine"]["cpu_model"]} '
              f'({res["machine"]["cores"]} cores); the {len(res["runs"])} trainings took '
              f'{render._minutes(sum(r["wall_seconds"] for r in res["runs"]))} in all, {res["workers"]} at a time.']
    if res.get('plain_loop'):
        P = res['plain_loop']['sizes']
        seeds = lambda xs: ', '.join(f'{x:.2f}' for x in xs)
        lines += ['', f'The plain PyTorch loop of the bench\'s accuracy section (no augmentation, no warm-up, no clipping), trained '
                      'on the same runs\' splits with the same seeds and budget, on the cohort\'s held-out subjects:', '',
                  '| development subjects | recipe, test MAE per seed | plain loop, test MAE per seed | `mae_over_plain_loop` [95% CI] |',
                  '|---:|---|---|---|']
        lines += [f'| {n} | {seeds(r["agenb_test_mae_per_seed"])} | {seeds(r["plain_test_mae_per_seed"])} | '
                  f'{r["mae_over_plain_loop"]:.3f} [{r["mae_over_plain_loop_ci95"][0]:.3f}, {r["mae_over_plain_loop_ci95"][1]:.3f}] |'
                  for n, r in P.items()]
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', type=int, nargs='+', default=list(SIZES), help='development subjects per model (default: %(default)s)')
    p.add_argument('--workers', type=int, default=2, help='trainings at a time, one thread each (default: %(default)s)')
    p.add_argument('--from-runs', action='store_true', help='rebuild the results from the finished runs in bench/out/ceiling_runs '
                   '(whatever commit trained them: each run\'s is recorded) instead of training')
    p.add_argument('--plain-loop', type=int, nargs='*', metavar='N',
                   help='also train bench/run.py\'s plain loop on the runs of these sizes (default, flag alone: '
                        f'{" and ".join(map(str, PLAIN_SIZES))}), one at a time, and compare it with the recipe on the held-out subjects')
    p.add_argument('--render', action='store_true', help='only render bench/README.md\'s block again from bench/ceiling_results.json')
    a = p.parse_args(argv)
    if a.render:
        render.update_readme(render.README, None, 'ceiling', ceiling_block(json.loads(RESULTS.read_text())))
        return print(f'rendered from {B.rel(RESULTS)}')
    sizes = sorted(set(a.sizes))
    official = tuple(sizes) == SIZES
    dest = RESULTS if official else B.OUT / 'ceiling_results.json'
    t0 = time.time()
    agenb = {'version': __version__, **git_info(B.ROOT)}   # read before anything is written
    bench_root = B.ensure_data('bench')
    cohort_root = B.OUT / 'data_ceiling'
    ensure_synth(cohort_root, log=lambda m: print(f'ceiling: {m}', flush=True), **COHORT)
    out_dir = B.OUT / 'ceiling_runs'
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = split_files(cohort_root, out_dir, sizes)
    jobs = [(n, s) for n in sizes for s in SEEDS]
    print(f'ceiling: {len(jobs)} trainings ({len(sizes)} sizes x {len(SEEDS)} seeds), {a.workers} at a time ...', flush=True)
    with ThreadPoolExecutor(a.workers) as ex:
        done = list(ex.map(lambda ns: train_and_predict(cohort_root, bench_root, out_dir, *ns, splits[ns[0]], a.from_runs), jobs))
    for r in done: r.update(run_record(r['run_dir']))
    options = {json.dumps(r['options'], sort_keys=True) for r in done}
    assert len(options) == 1, f'the runs were trained with different options: {options}'
    trained_by = {json.dumps(r['git'], sort_keys=True) for r in done}
    run_options = json.loads(options.pop())
    for r in done: del r['options']
    bench_j = scored_images(bench_root, bench_test_subjects(bench_root))
    held = pd.read_csv(splits[sizes[0]], dtype={'subject': str}).query("split == 'test'").subject
    held_j = scored_images(cohort_root, held)
    bench_preds, held_preds = {}, {}
    for r in done:
        pb = pd.read_csv(r['bench_predictions']).set_index('filename').pred
        ph = pd.read_csv(Path(r['run_dir']) / 'predictions.csv').set_index('filename').pred
        assert set(held_j.filename) == set(ph.index), f'{r["run_dir"]} tested other images than the held-out subjects\''
        bench_preds.setdefault(r['n'], []).append(bench_j.filename.map(pb).to_numpy())
        held_preds.setdefault(r['n'], []).append(held_j.filename.map(ph).to_numpy())
    assert all(np.isfinite(p).all() for ps in bench_preds.values() for p in ps), 'a bench test image was not predicted'
    res = {'what': 'issue 27: the recipe trained on more people of another synthetic cohort, scored on the bench test images',
           'spec': SPEC, 'variant': VARIANT, 'recipe_options': run_options, 'sizes': sizes, 'seeds': list(SEEDS),
           'val_share': VAL_SHARE, 'held_out_subjects': HELD_OUT, 'workers': a.workers,
           'bench_test': curve(bench_j, bench_preds), 'held_out_test': curve(held_j, held_preds),
           'runs': [{k: (B.rel(v) if isinstance(v, Path) else v) for k, v in r.items() if k != 'commit'} for r in done],   # r['git'] has it
           'data': B.data_record(bench_root), 'cohort': B.data_record(cohort_root), 'machine': B.machine_info(),
           'agenb': {'version': agenb['version'], **json.loads(trained_by.pop())} if len(trained_by) == 1 else
                    {'version': agenb['version'], 'commit': None, 'dirty': None, 'runs_trained_by': sorted(trained_by)},
           'results_written_by': agenb, 'command': ' '.join(['bench/ceiling.py', *(argv if argv is not None else sys.argv[1:])]),
           'created_at': datetime.now().isoformat(timespec='seconds'), 'wall_seconds': round(time.time() - t0, 1)}
    if a.plain_loop is not None:
        todo = [r for r in done if r['n'] in (a.plain_loop or PLAIN_SIZES)]
        print(f'ceiling: the plain loop on {len(todo)} runs\' splits, one at a time ...', flush=True)
        plains = [plain_loop_job(r, out_dir) for r in todo]
        res['plain_loop'] = {'what': B.PLAIN_LOOP, 'on': 'each agenb run\'s split.csv: the same subjects, seed and budget; scored on '
                                                      'the cohort\'s held-out subjects', 'sizes': plain_comparison(held_j, done, plains),
                             'runs': [{k: v for k, v in p.items() if k != 'predictions'} for p in plains]}
    res['method'] = res['bench_test']['method']
    dest.write_text(json.dumps(res, indent=1) + '\n')
    print(ceiling_block(res))
    if official: render.update_readme(render.README, res, 'ceiling', ceiling_block(res))
    print(f'wrote {B.rel(dest)}')


if __name__ == '__main__':
    main()
