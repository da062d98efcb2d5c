"""`python -m agenb.experiment compare OOF.csv`: the honest leaderboard of any tool's out-of-fold predictions."""
import pandas as pd

from conftest import agenb
from agenb.stats import simulate_oof


def test_compare_writes_board_and_page(tmp_path):
    simulate_oof(n_variants=3, n_subjects=30, n_seeds=2, better='v2', factor=0.5, seed=1).to_csv(tmp_path / 'oof.csv', index=False)
    r = agenb('experiment', 'compare', tmp_path / 'oof.csv', '--baseline', 'v0', '--n-boot', '500', '--out', tmp_path / 'cmp')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / 'cmp')
    board = pd.read_csv(tmp_path / 'cmp' / 'leaderboard.csv')
    assert board['variant'].iloc[0] == 'v2' and board.set_index('variant').loc['v2', 'distinguishable_from_baseline']
    assert (board['interval_covers'] == 'seeds, subjects').all()
    page = (tmp_path / 'cmp' / 'comparison.html').read_text()
    assert '<img' in page and 'v2' in page and 'winner' in page


def test_compare_bad_input_is_one_line(tmp_path):
    oof = simulate_oof(n_variants=2, n_subjects=10, seed=0)
    oof.drop(columns=['fold']).to_csv(tmp_path / 'nofold.csv', index=False)
    oof[oof['subject'] != '3'].to_csv(tmp_path / 'gap.csv', index=False)          # unpaired: v0 and v1 both lack 3: fine
    oof[~((oof['variant'] == 'v1') & (oof['subject'] == '3'))].to_csv(tmp_path / 'unpaired.csv', index=False)
    oof.assign(seed=oof['seed'].where(oof['variant'] == 'v0')).to_csv(tmp_path / 'noseed.csv', index=False)   # another tool left v1's blank
    oof.assign(subject=oof['subject'].where(oof['subject'] != '4')).to_csv(tmp_path / 'nosubject.csv', index=False)
    for name, msg in (('nofold.csv', 'missing column(s) fold'), ('unpaired.csv', 'variant v1 (seed 0) has no prediction for 1 of the 10'),
                      ('noseed.csv', 'column seed is blank in 30 row(s)'), ('nosubject.csv', 'column subject is blank in 6 row(s)'),
                      ('absent.csv', 'no such file')):
        r = agenb('experiment', 'compare', tmp_path / name)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr, (name, r.stderr)
    assert not (tmp_path / 'nofold_comparison').exists() and not (tmp_path / 'unpaired_comparison').exists()
    r = agenb('experiment', 'compare', tmp_path / 'gap.csv', '--n-boot', '200')
    assert r.returncode == 0 and pd.read_csv(tmp_path / 'gap_comparison' / 'leaderboard.csv')['n_subjects'].iloc[0] == 9
