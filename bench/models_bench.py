#!/usr/bin/env python
"""The models table of issue 16: `python bench/models_bench.py` -> bench/models_results.json and a markdown table.

On the bench synthetic data (preset `bench`, written for the three muscles TA, GM, BB of one cohort: TA's files are
those of `make bench`'s data) and at one budget (same architecture, image size, epochs, images per optimizer step,
training seeds and split), it trains:

  plain           image regression (the mae recipe), TA only
  ema             + --ema-decay
  covariates      + --covariates sex,bmi,echo_mean,echo_skew
  distribution    + --head distribution (soft Gaussian labels, KL divergence)
  subject_views   + --subject-views 3 (mean pool); batch = 32 // 3 subjects, so ~the same images per step
  three_muscles   TA, GM and BB (--image-dir three times), the plain run's split (--split-file: by subject)
  combined        every technique above whose *validation* subject-level MAE beat plain's (never the test set)

Every row is trained once per training seed (`--seeds`, default 42 and 43), all on the split of the plain row's first
seed (by subject: the same test subjects throughout). Each row: test MAE (a subject-view run's rows are subjects),
subject-level MAE, the MAE of subjects aged 45-64, the slope of predicted on true age (subject level), each the mean
over the seeds; the generator's oracle on exactly the same test images (image level, and averaged over each subject's
images), and the ratio of the subject-level MAE to that oracle. The intervals resample the seeds and the test subjects
(agenb.stats.boot_means), so they hold the training's noise as well as the test set's.
`--only NAME ...` reruns some rows (the others are kept from models_results.json); `--epochs`/`--image-size` change
the budget (then the results go to bench/out/ instead).
"""
from __future__ import annotations
import argparse, json, os, shutil, sys, time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as B   # bench/run.py: paths, data fingerprint, CLI runner, machine record
import render     # bench/render.py: fills the marked blocks of bench/README.md

BUDGET = dict(arch='resnet18', image_size=64, batch_size=32, epochs=20, lr=1e-3, warmup_epochs=2, seed=42)
SEEDS = (42, 43)   # training seeds of every row (the first is BUDGET's; its run folders keep the row's bare name)
MUSCLES = ('TA', 'GM', 'BB')
ROWS = {
    'plain': {},
    'ema': {'ema_decay': 0.99},
    'covariates': {'covariates': 'sex,bmi,echo_mean,echo_skew'},
    'distribution': {'head': 'distribution', 'age_bins': '0:100:2', 'label_sigma': 2.0},
    'subject_views': {'subject_views': 3, 'batch_size': BUDGET['batch_size'] // 3},
    'three_muscles': {'muscles': MUSCLES},
}
RESULTS = HERE / 'models_results.json'


def ensure_data():
    from agenb.synth import ensure_synth
    out = B.OUT / 'data_muscles'
    ensure_synth(out, preset='bench', muscles=MUSCLES, log=lambda m: print(f'models bench: {m}', flush=True))
    return out


def command(root, out_dir, name, budget, opts, split_file=None):
    "The trainer command line of one row."
    opts = dict(opts)
    muscles = opts.pop('muscles', ('TA',))
    cmd = [sys.executable, '-m', 'agenb.train']
    for m in muscles: cmd += ['--image-dir', str(root / m / 'Healthy' / 'Images')]
    for m in muscles: cmd += ['--excel-path', str(root / m / 'characteristics.xlsx')]
    cmd += ['--no-pretrained', '--device', 'cpu', '--no-report', '--checkpoint-every', '0', '--plot-interval', '100000',
            '--gradcam-n', '0', '--deterministic', '--num-workers', '2', '--loss', 'mae', '--cache-dir', str(B.OUT / 'cache'),
            '--output-dir', str(out_dir), '--run-name', name]
    if split_file: cmd += ['--split-file', str(split_file)]
    for k, v in {**budget, **opts}.items(): cmd += ['--' + k.replace('_', '-'), str(v)]
    return cmd


def _boot_ci(err, oracle_err, n_boot=2000, seed=0):
    "95% bootstrap intervals over test subjects of the mean absolute error and of its ratio to the oracle's (paired)."
    from agenb.stats import mean_ci, ratio_ci
    ci = lambda v: [round(float(x), 3) for x in v]
    return ci(mean_ci(err, n_boot, seed)[1:]), ci(ratio_ci(err, oracle_err, n_boot, seed)[1:])

def _mae(a, b): return float(np.mean(np.abs(np.asarray(a, float) - np.asarray(b, float)))) if len(a) else None


def row_result(run_dir, root, wall, errors=False):
    """The table's numbers for one finished run, its oracle on exactly its test images; with `errors`, also the
    absolute errors of the run and of the oracle per test subject (a frame indexed by subject)."""
    from agenb.runs import predict_split
    m = json.loads((run_dir / 'metrics.json').read_text())
    cfg = json.loads((run_dir / 'config.json').read_text())
    subj = pd.read_csv(run_dir / 'subject_predictions.csv', dtype={'subject': str})
    split = pd.read_csv(run_dir / 'split.csv', dtype={'subject': str})
    test = split[split.split == 'test'].assign(muscle=lambda d: d.path.map(lambda p: Path(p).parts[-4]),
                                               filename=lambda d: d.path.map(lambda p: Path(p).name))
    lat = pd.read_csv(root / 'synth_latents.csv', dtype={'subject': str})
    lat = lat[lat.cohort == 'Healthy'][['muscle', 'filename', 'oracle_pred']]
    j = test.merge(lat, on=['muscle', 'filename'], how='left')
    assert j.oracle_pred.notna().all() and len(j) == len(test)
    osub = j.groupby('subject').agg(age=('age', 'first'), oracle=('oracle_pred', 'mean'))
    mid = subj[(subj.age >= 45) & (subj.age < 65)]
    omid = osub[(osub.age >= 45) & (osub.age < 65)]
    val = predict_split(run_dir, 'val')          # the choice of the combination: validation subjects only
    vsub = val.groupby('subject').agg(age=('age', 'first'), pred=('pred', 'mean'))
    smae = m['subject_level']['mae']
    both = subj.set_index('subject')[['age', 'pred']].join(osub['oracle'], how='inner')
    assert len(both) == len(subj)
    err = pd.DataFrame({'err': (both.pred - both.age).abs(), 'oracle_err': (both.oracle - both.age).abs()})
    res = {
        'test_mae': round(m['overall']['mae'], 3), 'prediction_unit': m.get('prediction_unit', 'image'),
        'subject_mae': round(smae, 3), 'mae_45_64': round(_mae(mid.age, mid.pred), 3), 'n_45_64': len(mid),
        'slope': round(float(np.polyfit(subj.age, subj.pred, 1)[0]), 3),
        'oracle_image_mae': round(_mae(j.age, j.oracle_pred), 3), 'oracle_subject_mae': round(_mae(osub.age, osub.oracle), 3),
        'oracle_45_64': round(_mae(omid.age, omid.oracle), 3),
        'subject_mae_over_oracle': round(smae / _mae(osub.age, osub.oracle), 3),
        'val_subject_mae': round(_mae(vsub.age, vsub.pred), 3),
        'n_test_subjects': int(m['subject_level']['n']), 'n_test_images': len(test),
        'best_epoch': cfg.get('best_epoch'), 'wall_seconds': round(wall, 1), 'run_dir': B.rel(run_dir),
    }
    if errors: return res, err           # a table row: seeds_row draws the intervals over seeds and subjects
    mae_ci, ratio_ci = _boot_ci(err.err, err.oracle_err)
    return dict(res, subject_mae_ci95=mae_ci, subject_mae_over_oracle_ci95=ratio_ci)   # bootstrap over test subjects


MEANS = ('test_mae', 'subject_mae', 'mae_45_64', 'slope', 'val_subject_mae')   # a row's figures: the mean over seeds
SAME = ('prediction_unit', 'n_45_64', 'oracle_image_mae', 'oracle_subject_mae', 'oracle_45_64', 'n_test_subjects', 'n_test_images')

def seeds_row(runs, seeds, n_boot=2000, boot_seed=0):
    """One row of the table from its runs, one per training seed (`runs`: [(row_result, per-subject errors)]): the mean
    of each figure over the seeds, and 95% intervals from agenb.stats.boot_means, which resamples the seeds and the
    test subjects (the oracle on the same subject resamples: paired)."""
    from agenb.stats import boot_means, percentile_interval
    res = [r for r, _ in runs]
    for k in SAME:
        if len({r[k] for r in res}) > 1: B.refuse(f'models bench: the seeds of {res[0]["run_dir"]} disagree on {k}: another split?')
    E = pd.concat([e.err for _, e in runs], axis=1)
    if E.isna().any().any(): B.refuse(f'models bench: the seeds of {res[0]["run_dir"]} predicted other test subjects')
    M = boot_means({'row': E.to_numpy().T, 'oracle': runs[0][1].oracle_err.loc[E.index].to_numpy()[None]}, n_boot, boot_seed)
    r4 = lambda v: [round(float(x), 3) for x in v]
    row = {**{k: round(float(np.mean([r[k] for r in res])), 3) for k in MEANS}, **{k: res[0][k] for k in SAME}}
    row['subject_mae_over_oracle'] = round(row['subject_mae'] / row['oracle_subject_mae'], 3)
    row.update(subject_mae_ci95=r4(percentile_interval(M[0])), subject_mae_over_oracle_ci95=r4(percentile_interval(M[0] / M[1])),
               ci_method=f'{n_boot} bootstrap resamples: the {len(seeds)} training seed(s) and the {E.shape[0]} test subjects '
                         f'(agenb.stats.boot_means, seed {boot_seed}); percentile interval',
               seeds=list(seeds), wall_seconds=round(sum(r['wall_seconds'] for r in res), 1), run_dir=res[0]['run_dir'],
               per_seed=[{'seed': s_, **{k: r[k] for k in ('test_mae', 'subject_mae', 'val_subject_mae', 'best_epoch', 'wall_seconds', 'run_dir')},
                          **({'agenb_commit': r['agenb_commit']} if 'agenb_commit' in r else {})} for s_, r in zip(seeds, res)])
    return row

def run_name(name, seed, seeds):
    "The run folder's name of a row at one seed: the bare row name for the first seed (as one-seed tables had it)."
    return name if seed == seeds[0] else f'{name}_s{seed}'


def train_row(root, out_dir, name, budget, opts, seeds, split_file=None, first_split=None):
    """A row trained once per seed: the first seed on `split_file` (None: the run draws its split), the others on
    `first_split` (the plain row's first split), or on the first seed's own split when that is None."""
    runs = []
    for seed in seeds:
        rn = run_name(name, seed, seeds)
        print(f'models bench: {rn} ...', flush=True)
        split = split_file if seed == seeds[0] else (first_split or B.ROOT / runs[0][0]['run_dir'] / 'split.csv')
        run_dir, wall = B.run_cli(command(root, out_dir, rn, dict(budget, seed=seed), opts, split), B.ACCURACY_ENV,
                                  out_dir / f'{rn}.log', 6 * 3600)
        runs.append(row_result(run_dir, root, wall, errors=True))
        r = runs[-1][0]
        print(f'models bench: {rn}: subject MAE {r["subject_mae"]} (oracle {r["oracle_subject_mae"]}, '
              f'x{r["subject_mae_over_oracle"]}), 45-64 {r["mae_45_64"]}, slope {r["slope"]}, {wall:.0f} s', flush=True)
    return seeds_row(runs, seeds)


def collected_row(out_dir, root, name, seeds):
    "The row from the latest completed run folder of each seed of `name` (for --from-runs)."
    runs = []
    for seed in seeds:
        rn = run_name(name, seed, seeds)
        for d in sorted(out_dir.glob(f'run_*_{rn}'), reverse=True):
            cfg = json.loads((d / 'config.json').read_text())
            if cfg.get('status') != 'completed': continue
            wall = (datetime.fromisoformat(cfg['finished_at']) - datetime.fromisoformat(cfg['started_at'])).total_seconds()
            r, e = row_result(d, root, wall, errors=True)
            runs.append((dict(r, agenb_commit=(cfg.get('environment') or {}).get('git')), e))
            break
        else: B.refuse(f'models bench: no completed run folder run_*_{rn} in {out_dir}')
    return dict(seeds_row(runs, seeds), wall_from='config.json started_at/finished_at')


def combination(rows) -> list:
    "The techniques whose validation subject-level MAE beat the plain row's (chosen without the test set)."
    base = rows['plain']['val_subject_mae']
    return [k for k in ROWS if k != 'plain' and k in rows and rows[k]['val_subject_mae'] < base]


def combined_options(names) -> dict:
    opts = {}
    for n in names: opts.update(ROWS[n])
    if 'subject_views' in names: opts['batch_size'] = BUDGET['batch_size'] // ROWS['subject_views']['subject_views']
    return opts


def table(res) -> str:
    cols = ('test_mae', 'subject_mae', 'mae_45_64', 'slope', 'oracle_subject_mae', 'subject_mae_over_oracle', 'val_subject_mae', 'wall_seconds')
    head = '| row | ' + ' | '.join(cols) + ' |\n|---|' + '---:|' * len(cols) + '\n'
    rows = res['rows']
    cell = lambda r, c: f"{r[c]} [{r[c + '_ci95'][0]}, {r[c + '_ci95'][1]}]" if r.get(c + '_ci95') else str(r[c])
    lines = [f'| {k}{" (" + "+".join(res["combined_of"]) + ")" if k == "combined" else ""} | ' + ' | '.join(cell(rows[k], c) for c in cols) + ' |'
             for k in rows]
    return head + '\n'.join(lines)


def models_block(res) -> str:
    "bench/README.md's block of the models table, rendered from models_results.json."
    b, m, ag = res['budget'], res.get('machine') or {}, res.get('agenb') or {}
    C = res['rows'].get('combined') or {}
    runs = [p for r in res['rows'].values() for p in (r.get('per_seed') or [r])]
    commits = sorted({(r.get('agenb_commit') or ag).get('commit', '?')[:10] + (' (uncommitted changes)' if (r.get('agenb_commit') or ag).get('dirty') else '')
                      for r in runs})
    seeds = res.get('seeds') or [b['seed']]
    trained = ', '.join(f'`{c}`' for c in commits)
    return '\n\n'.join([
        f"Budget of every row: {b['arch']} from scratch, {b['image_size']} px, {b['epochs']} epochs, batch {b['batch_size']} "
        f"images (a subject-view run: {b['batch_size'] // 3} subjects of 3 images), lr {b['lr']}, "
        f"{'training seeds ' + ', '.join(map(str, seeds)) + ' (each figure: the mean over the seeds)' if len(seeds) > 1 else 'seed ' + str(seeds[0])}, "
        f"one split by subject; {res['data']['fingerprint'].get('params', {}).get('subjects')} healthy subjects of the bench preset"
        f"{' (agenb.synth version ' + str(res['data']['fingerprint']['version']) + ')' if res['data']['fingerprint'].get('version', 3) > 3 else ''}, "
        f"muscles {', '.join(MUSCLES)}. Trained at commit {trained}, table written at `{(ag.get('commit') or '?')[:10]}`"
        f"{' (uncommitted changes)' if ag.get('dirty') else ''} on {m.get('cpu_model')}, {m.get('cores')} cores; "
        f"the trainings took {round(res['seconds_all_rows'] / 60)} min in all.",
        table(res),
        ("In brackets: 95% bootstrap intervals over the training seeds and the test subjects (the ratio paired with the "
         "oracle on the same subject resamples); wall_seconds: all seeds of a row together. " if len(seeds) > 1 else
         "In brackets: 95% bootstrap intervals over the test subjects (the ratio paired with the oracle on the same resamples). ") +
        f"Combination chosen by {res['chosen_by']}: {' + '.join(res['combined_of'] or ['none'])} (a comparison of "
        f"{'seed-averaged' if len(seeds) > 1 else 'single-seed'} validation figures on the same validation subjects). "
        f"Its subject-level MAE is {C.get('subject_mae_over_oracle')}x the oracle (target 1.10x)."])

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--only', nargs='+', choices=[*ROWS, 'combined'])
    p.add_argument('--epochs', type=int); p.add_argument('--image-size', type=int)
    p.add_argument('--seeds', type=int, nargs='+', default=list(SEEDS), help='training seeds of every row (default: %(default)s)')
    p.add_argument('--from-runs', action='store_true',
                   help='rebuild the rows from the finished run folders in bench/out/models_runs (the latest of each '
                        'name; wall time from their config.json) instead of training; commit of each from its config.json')
    a = p.parse_args(argv)
    budget = dict(BUDGET, **{k: v for k, v in (('epochs', a.epochs), ('image_size', a.image_size)) if v}, seed=a.seeds[0])
    seeds = tuple(a.seeds)
    official = budget == BUDGET and seeds == SEEDS
    dest = RESULTS if official else B.OUT / 'models_results.json'
    old = json.loads(dest.read_text()) if dest.is_file() and a.only else {}
    if old and tuple(old.get('seeds') or (old['budget']['seed'],)) != seeds:
        B.refuse(f'models bench: {B.rel(dest)} was written with seeds {old.get("seeds") or [old["budget"]["seed"]]}; '
                 f'--only keeps its other rows, so give the same --seeds or rerun every row')
    t0 = time.time()
    from agenb import __version__
    from agenb.core import git_info
    agenb = {'version': __version__, **git_info(B.ROOT)}   # read before anything is written
    root = ensure_data()
    out_dir = B.OUT / 'models_runs'
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = dict(old.get('rows', {}))
    todo = a.only or [*ROWS, 'combined']
    if a.from_runs:
        for name in ROWS:
            if name in todo: rows[name] = collected_row(out_dir, root, name, seeds)
        todo = [t for t in todo if t == 'combined']
    plain_split = lambda: B.ROOT / rows['plain']['run_dir'] / 'split.csv'   # the plain row's first seed's split
    for name in ROWS:
        if name not in todo: continue
        if name != 'plain' and 'plain' not in rows: B.refuse(f'models bench: {name} needs the plain row first (its split)')
        split = plain_split() if name == 'three_muscles' else None   # by subject: the same test subjects
        rows[name] = train_row(root, out_dir, name, budget, ROWS[name], seeds, split,
                               first_split=None if name == 'plain' else plain_split())
    combo = old.get('combined_of')
    if 'combined' in todo:
        combo = combination(rows)
        split = plain_split() if 'three_muscles' in combo else None
        if len(combo) > 1: rows['combined'] = train_row(root, out_dir, 'combined', budget, combined_options(combo), seeds,
                                                        split, first_split=plain_split())
        else:   # one technique (or none) beat plain: the combination is that row's run itself (same options, split, seed)
            rows['combined'] = dict(rows[combo[0] if combo else 'plain'], same_run_as=combo[0] if combo else 'plain')
    kept = sorted(set(old.get('rows', {})) - set(todo))
    earlier = {'rows': kept, 'agenb': old.get('agenb'), 'created_at': old.get('created_at')} if kept else None
    res = {'what': 'issue 16 models table: plain, each technique alone, their combination chosen on validation',
           'budget': budget, 'seeds': list(seeds), 'rows': rows, 'combined_of': combo, 'combined_options': combined_options(combo or []),
           'chosen_by': "validation subject-level MAE below the plain row's (the test set plays no part)",
           'target': 'combined subject-level MAE within 1.10x the oracle averaged over each subject\'s images',
           'data': B.data_record(root), 'machine': B.machine_info(), 'agenb': agenb, 'command': ' '.join(['bench/models_bench.py', *(argv or sys.argv[1:])]),
           'created_at': datetime.now().isoformat(timespec='seconds'), 'seconds': round(time.time() - t0, 1),
           'rows_from_an_earlier_invocation': earlier,
           'seconds_all_rows': round(sum(r['wall_seconds'] for k, r in rows.items() if 'same_run_as' not in r), 1)}
    dest.write_text(json.dumps(res, indent=1) + '\n')
    md = table(res)
    print(md)
    if official: render.update_readme(render.README, res, 'models', models_block(res))
    print(f'wrote {B.rel(dest)}')


if __name__ == '__main__':
    main()
