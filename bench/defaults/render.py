#!/usr/bin/env python
"""Render bench/defaults/README.md's leaderboard tables from the committed leaderboards (`<name>_leaderboard.csv`,
copied from `EXP_DIR/leaderboard.csv` of `python -m agenb.experiment run bench/defaults/<name>.yaml`), so that no
figure is typed: `python bench/defaults/render.py`. tests/test_bench.py fails when the two disagree."""
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import render  # noqa: E402  (bench/render.py: fill)

# each table's name and the file that made it (an experiment spec, or a script that scores runs already trained)
SOURCES = {'lr_scratch': 'lr_scratch.yaml', 'augment': 'augment.yaml', 'selection': 'selection.py', 'ema_size': 'ema_size.yaml'}
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


def main():
    p = HERE / 'README.md'
    text = p.read_text()
    for name in EXPERIMENTS: text = render.fill(text, name, table(name))
    p.write_text(text)


if __name__ == '__main__':
    main()
