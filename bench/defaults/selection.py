#!/usr/bin/env python
"""Which weights should a run keep, and does test-time augmentation help? Measured on fold runs already trained by an
experiment, so every rule is scored on the same trained networks (a paired comparison that costs inference only):

  best        the epoch with the lowest validation MAE (agenb's best_model.pth: what the experiment scored)
  last        the last epoch (checkpoint_epoch_<epochs>.pth; the cosine schedule has brought the rate down by then)
  best+tta    best, averaged over the run's test-time views (agenb.predict.tta_views: identity and +/- half the rotation)
  last+tta    last, the same views

For each fold run of one variant, the run's out-of-fold images (its test fold, as in EXP_DIR/oof_predictions.csv) are
predicted again with each rule; `best` must reproduce the experiment's own predictions (a check of the method). The
rows go through agenb's leaderboard (agenb.exp_report.compare_oof, baseline `best`): the same statistics as
`python -m agenb.experiment`.

    python bench/defaults/selection.py bench/out/exp_lr_scratch lr1e-3 selection
    -> bench/defaults/selection_leaderboard.csv (committed) and bench/out/selection_oof.csv (+ comparison.html)
"""
import argparse, json, sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

from agenb.core import InputError  # noqa: E402
sys.path.insert(0, str(HERE))
from board import write_leaderboard  # noqa: E402  (bench/defaults/board.py)
from agenb.predict import predict_images, read_images  # noqa: E402
from agenb.runs import load_run_model  # noqa: E402
sys.path.insert(0, str(HERE.parent))
from run import refuse  # noqa: E402  (bench/run.py: one line on stderr, exit 2)

RULES = ('best', 'last', 'best+tta', 'last+tta')


def run_dir_of(exp_dir, variant, seed, fold) -> Path:
    "The run folder of one fold run (EXP_DIR/runs/<variant>_s<seed>_f<fold>/run_*), which must be complete."
    runs = [p for p in (Path(exp_dir) / 'runs' / f'{variant}_s{seed}_f{fold}').glob('run_*') if (p / 'metrics.json').is_file()]
    if len(runs) != 1: refuse(f'selection: {exp_dir}: expected one finished run of {variant} seed {seed} fold {fold}, found {len(runs)}')
    return runs[0]


def last_checkpoint(run_dir) -> str:
    "The file name of the checkpoint of the run's last epoch; the run must have trained every epoch it was given."
    cfg = json.loads((run_dir / 'config.json').read_text())
    epochs, done = cfg['args']['epochs'], cfg.get('epochs_completed')
    if done != epochs: refuse(f'selection: {run_dir} stopped after {done} of {epochs} epochs: its last epoch is not epoch {epochs}')
    name = f'checkpoint_epoch_{epochs:04d}.pth'
    if not (run_dir / name).is_file(): refuse(f'selection: {run_dir} has no {name} (give --checkpoint-every a divisor of the epochs)')
    return name


def rule_predictions(run_dir, files) -> dict:
    "{rule: predictions of `files` (names in the run's image folder, in order)} for each rule in RULES."
    pred = pd.read_csv(run_dir / 'predictions.csv')
    paths = pred.set_index('filename').loc[files, 'path'].tolist()
    out = {}
    for which, ck in (('best', 'best_model.pth'), ('last', last_checkpoint(run_dir))):
        rm = load_run_model(run_dir, ck)
        decoded = read_images(paths, rm.prep)[:2]
        for tta in (False, True):
            df, _, views = predict_images(rm, paths, tta=tta, decoded=decoded, intervals=False)
            if tta and len(views) < 2: refuse(f'selection: {run_dir} trained without rotation or flips: it has no test-time views')
            out[which + ('+tta' if tta else '')] = df['pred'].to_numpy()
    return out


def selection_oof(exp_dir, variant) -> pd.DataFrame:
    "OOF rows (variant = rule) for every fold run of `variant` in the experiment `exp_dir`."
    oof = pd.read_csv(Path(exp_dir) / 'oof_predictions.csv', dtype={'subject': str, 'variant': str})
    oof = oof[oof['variant'] == variant]
    if oof.empty: refuse(f'selection: {exp_dir}/oof_predictions.csv has no rows of variant {variant}')
    parts = []
    for (seed, fold), g in oof.groupby(['seed', 'fold'], sort=True):
        run_dir = run_dir_of(exp_dir, variant, seed, fold)
        try: preds = rule_predictions(run_dir, g['file'].tolist())
        except InputError as e: refuse(f'selection: {run_dir}: {e} (this script scores plain image-level runs)')
        gap = float(np.abs(preds['best'] - g['prediction'].to_numpy()).max())
        if gap > 1e-3: refuse(f'selection: {run_dir}: best_model.pth does not reproduce the experiment\'s predictions (off by {gap:.4f} years)')
        for rule in RULES: parts.append(g.assign(variant=rule, prediction=preds[rule]))
        print(f'selection: {variant} seed {seed} fold {fold}: ' + ', '.join(
            f'{r} {np.abs(preds[r] - g["age"].to_numpy()).mean():.2f}' for r in RULES), flush=True)
    return pd.concat(parts, ignore_index=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('exp_dir'); p.add_argument('variant'); p.add_argument('name')
    a = p.parse_args(argv)
    oof = selection_oof(a.exp_dir, a.variant)
    write_leaderboard(a.name, oof, 'best')

if __name__ == '__main__':
    main()
