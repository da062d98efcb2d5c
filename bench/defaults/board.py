"""The leaderboard step that bench/defaults/selection.py and combine.py share: OOF rows -> agenb's leaderboard
(agenb.exp_report.compare_oof) -> `bench/defaults/<name>_leaderboard.csv`, with the OOF table and its comparison page
under bench/out/ (git-ignored)."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

from agenb.exp_report import compare_oof  # noqa: E402

SHOWN = ['variant', 'rank', 'subject_mae', 'subject_mae_ci_low', 'subject_mae_ci_high', 'diff_to_baseline',
         'diff_to_baseline_ci_low', 'diff_to_baseline_ci_high', 'distinguishable_from_baseline']


def write_leaderboard(name, oof, baseline, options=None):
    "Rank `oof` against `baseline`, add each variant's `options` (a dict, when given), write and print the board."
    path = ROOT / 'bench' / 'out' / f'{name}_oof.csv'
    path.parent.mkdir(parents=True, exist_ok=True)
    oof.to_csv(path, index=False)
    board, out = compare_oof(path, baseline=baseline)
    if options is not None: board['options'] = board['variant'].map(options)
    board.to_csv(HERE / f'{name}_leaderboard.csv', index=False)
    print(board[SHOWN].to_string(index=False))
    print(f'wrote {HERE / (name + "_leaderboard.csv")} and {out}')
    return board
