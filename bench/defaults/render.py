#!/usr/bin/env python
"""Render bench/defaults/README.md's leaderboard tables from the committed leaderboards (`<name>_leaderboard.csv`,
copied from `EXP_DIR/leaderboard.csv` of `python -m agenb.experiment run bench/defaults/<name>.yaml`), so that no
figure is typed: `python bench/defaults/render.py`. tests/test_bench.py fails when the two disagree."""
import json, sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import render  # noqa: E402  (bench/render.py: fill)

# each table's name and the file that made it (an experiment spec, or a script that scores runs already trained)
SOURCES = {'lr_scratch': 'lr_scratch.yaml', 'lr_confirm': 'lr_confirm.yaml', 'finetune': 'finetune.yaml',
           'finetune_scratch': 'finetune.yaml', 'augment': 'augment.yaml', 'selection': 'selection.py', 'ema_size': 'ema_size.yaml',
           'flips': 'flips.yaml', 'swa': 'swa.yaml', 'crops': 'crops.yaml',
           'rotation': 'rotation.yaml', 'optim': 'optim.yaml', 'geometry': 'geometry.yaml',
           'plain': 'plain.yaml', 'head_bias': 'head_bias.yaml', 'budget': 'budget.yaml', 'budget_half': 'budget_half.yaml',
           'batch': 'batch.yaml', 'echo': 'echo.yaml',
           'loss_arch': 'loss_arch.yaml', 'mixup': 'mixup.yaml'}
EXPERIMENTS = [n for n in SOURCES if (HERE / f'{n}_leaderboard.csv').is_file()]
RULES = {'best': 'lowest validation MAE (best_model.pth)', 'last': 'last epoch', 'best+tta': 'best, test-time views',
         'last+tta': 'last epoch, test-time views'}


def table(name) -> str:
    b = pd.read_csv(HERE / f'{name}_leaderboard.csv')
    ci = lambda x, k: f"{x[k]:+.2f} [{x[k + '_ci_low']:+.2f}, {x[k + '_ci_high']:+.2f}]" if pd.notna(x[k + '_ci_low']) else '(baseline)'
    rows = ['| rank | variant | options | subject MAE [95% CI] | folds mean +/- SD | vs baseline [95% CI] | separated? |',
            '|---|---|---|---|---|---|---|']
    for _, x in b.iterrows():
        what = f"`{x['options']}`" if 'options' in b and pd.notna(x['options']) else RULES.get(x['variant'], '')
        rows.append(f"| {x['rank']} | {x['variant']} | {what} | {x['subject_mae']:.2f} [{x['subject_mae_ci_low']:.2f}, "
                    f"{x['subject_mae_ci_high']:.2f}] | {x['fold_mae_mean']:.2f} +/- {x['fold_mae_sd']:.2f} | "
                    f"{ci(x, 'diff_to_baseline')} | {'yes' if x['distinguishable_from_baseline'] else 'no'} |")
    return '\n'.join(rows + ['', f"{int(b['n_subjects'].iloc[0])} development subjects, {int(b['n_seeds'].iloc[0])} seeds, "
                             f"{int(b['n_fold_runs'].iloc[0])} fold runs per variant; out-of-fold subject-level MAE (the test "
                             'subjects were not used); intervals resample subjects and seeds.'])


FINALS = [n for n in SOURCES if (HERE / f'{n}_final.json').is_file()]   # `experiment final` of a defaults experiment


def final_table(name) -> str:
    "The test set opened once (`<name>_final.json`): single models and the fold ensemble, with their intervals."
    f = json.loads((HERE / f'{name}_final.json').read_text())
    ci = lambda x: f"{x['test_subject_mae']:.2f} [{x['test_subject_mae_ci'][0]:.2f}, {x['test_subject_mae_ci'][1]:.2f}]"
    d, e = f['ensemble_vs_single'], f['ensemble']
    rows = ['| model | test subject MAE [95% CI] |', '|---|---|']
    rows += [f"| single model, seed {x['seed']} (trained on all development subjects) | {ci(x)} |" for x in f['single']]
    rows += [f"| fold ensemble ({e['n_models']} fold models) | {ci(e)} |", '',
             f"Ensemble minus single model, per test subject: {d['diff']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] "
             f"({d['n']} test subjects, {d['n_boot']} bootstrap resamples); the variant's OOF subject MAE {f['oof_subject_mae']:.2f} "
             f"(rank {f['oof_rank']} of {f['n_variants_compared']}); test set opening {f['opening']}."]
    return '\n'.join(rows)


def main():
    p = HERE / 'README.md'
    text = p.read_text()
    for name in EXPERIMENTS: text = render.fill(text, name, table(name))
    for name in FINALS: text = render.fill(text, f'{name}_final', final_table(name))
    p.write_text(text)


if __name__ == '__main__':
    main()
