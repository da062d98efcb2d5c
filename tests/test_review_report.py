"""Found by a review of compare and the report: numbers that did not say what they were computed on, or disagreed with
the run's files (each test failed before its fix)."""
import json, math, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_compare import make_run, cli
from agenb.compare import compare_runs
from agenb.stats import ratio_ci


def add_predictions(run, subjects, errors, ages=None, prefix='anon'):
    "Write predictions.csv (3 images per subject, the given absolute errors per image) and the matching metrics.json MAE."
    rows = []
    for i, s in enumerate(subjects):
        age = 30.0 + 5 * i if ages is None else ages[i]
        for k in range(3):
            e = errors[(3 * i + k) % len(errors)]
            rows.append({'path': f'/data/{prefix}_{s}_{k + 1}.png', 'filename': f'{prefix}_{s}_{k + 1}.png', 'subject': str(s),
                         'age': age, 'pred': age + e})
    df = pd.DataFrame(rows); df['error'] = df['pred'] - df['age']; df['abs_error'] = df['error'].abs()
    df.to_csv(run / 'predictions.csv', index=False)
    m = json.loads((run / 'metrics.json').read_text())
    m['overall']['mae'] = float(df['abs_error'].mean())
    (run / 'metrics.json').write_text(json.dumps(m))
    return df


def test_best_val_mae_is_the_kept_checkpoints(tmp_path):
    "With --min-delta the best epoch is not the one of the lowest val MAE: best_val_mae must be config.json's, the kept one."
    a = make_run(tmp_path, 'run_20260101_100000')           # history val MAE 10, 8, 6.5, 7
    cfg = json.loads((a / 'config.json').read_text())
    cfg.update(best_epoch=2, best_val_mae=8.0)               # 6.5 at epoch 3 did not beat 8 by min_delta 2
    (a / 'config.json').write_text(json.dumps(cfg))
    b = make_run(tmp_path, 'run_20260102_100000')
    cfg = json.loads((b / 'config.json').read_text()); cfg.update(best_epoch=3, best_val_mae=7.0)
    (b / 'config.json').write_text(json.dumps(cfg))
    m, _ = compare_runs([a, b], sort='val')
    assert m.loc['run_20260101_100000', 'best_epoch'] == 2 and m.loc['run_20260101_100000', 'best_val_mae'] == 8.0
    assert list(m.index) == ['run_20260102_100000', 'run_20260101_100000']   # ranked by the checkpoints' val MAE


def test_compare_gives_the_test_mae_an_interval_over_subjects(tmp_path):
    a = make_run(tmp_path / 'runs', 'run_20260101_100000')
    df = add_predictions(a, range(1, 9), [1.0, 2.0, 4.0, 8.0, 3.0])
    m, _ = compare_runs([a])
    g = df.groupby('subject')['abs_error']
    mae, lo, hi = ratio_ci(g.sum().to_numpy(), g.size().to_numpy(float))
    row = m.loc['run_20260101_100000']
    assert row['test_mae'] == pytest.approx(mae) and lo < mae < hi
    assert row['test_mae_ci_low'] == pytest.approx(lo) and row['test_mae_ci_high'] == pytest.approx(hi)
    r = cli(a, '--out', 'cmp', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'test_mae_ci_low' in r.stdout and 'bootstrap' in r.stdout
    assert f'{lo:.2f}' in (tmp_path / 'cmp.md').read_text()


def test_compare_refuses_predictions_that_disagree_with_metrics(tmp_path):
    a = make_run(tmp_path, 'run_20260101_100000')
    add_predictions(a, range(1, 5), [1.0, 2.0])
    m = json.loads((a / 'metrics.json').read_text()); m['overall']['mae'] = 9.99
    (a / 'metrics.json').write_text(json.dumps(m))
    r = cli(a, cwd=tmp_path)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'predictions.csv' in r.stderr and 'metrics.json' in r.stderr
    assert not (tmp_path / 'compare.csv').exists()


def test_compare_says_when_runs_were_tested_on_different_subjects(tmp_path):
    runs = tmp_path / 'runs'
    a, b, c = (make_run(runs, f'run_2026010{i}_100000') for i in (1, 2, 3))
    add_predictions(a, range(1, 6), [1.0, 2.0]); add_predictions(b, range(1, 6), [2.0, 3.0])
    add_predictions(c, range(11, 16), [0.5, 1.0])             # other test subjects: a lower MAE means nothing
    r = cli(a, b, '--out', 'same', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'NOT COMPARABLE' not in r.stdout
    r = cli(runs, '--out', 'cmp', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'NOT COMPARABLE' in r.stdout and 'different test sets' in r.stdout
    assert 'NOT COMPARABLE' in (tmp_path / 'cmp.md').read_text()
    t = pd.read_csv(tmp_path / 'cmp.csv', index_col='run')
    assert list(t['test_set']) == ['A', 'A', 'B']


def test_compare_says_when_the_data_or_split_differ(tmp_path):
    a, b = (make_run(tmp_path / 'runs', f'run_2026010{i}_100000') for i in (1, 2))
    for run, split, data in ((a, 's1', 'd1'), (b, 's2', 'd2')):
        cfg = json.loads((run / 'config.json').read_text())
        cfg['dataset']['split_sha256'] = split; cfg['data_fingerprint'] = {'images_sha256': data, 'excel_sha256': 'x'}
        (run / 'config.json').write_text(json.dumps(cfg))
        add_predictions(run, range(1, 6), [1.0, 2.0])        # the same test rows
    r = cli(a, b, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'different splits' in r.stdout and 'different data' in r.stdout


# ---- the per-run report ----------------------------------------------------------------------------------------------
import re, shutil
from conftest import agenb
from agenb.core import InputError
from agenb.report import render_report
from agenb.report_sections import load_run, metrics_section, curves_section, header_section, dataset_section


def text_of(html):
    "The visible text of an HTML fragment, tags dropped and whitespace collapsed."
    import html as h
    return ' '.join(h.unescape(re.sub(r'<[^>]+>', ' ', html)).split())


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    return Path(shutil.copytree(tiny_run, tmp_path / tiny_run.name, ignore=shutil.ignore_patterns('*.pth', 'report.*')))


def test_report_test_mae_has_its_interval_split_level_and_checkpoint(run_copy):
    r = load_run(run_copy)
    mae, lo, hi = ratio_ci(*(lambda g: (g.sum().to_numpy(), g.size().to_numpy(float)))(
        r.predictions.assign(e=(r.predictions.pred - r.predictions.age).abs()).groupby('subject').e))
    assert mae == pytest.approx(r.metrics['overall']['mae'])
    t = text_of(metrics_section(r))
    assert f'95% interval {lo:.3f} to {hi:.3f}' in t, t[:600]
    assert 'test split' in t and 'image level' in t and f'best_model.pth (epoch {r.config["best_epoch"]}' in t, t[:600]


def test_report_best_epoch_is_the_kept_checkpoint(run_copy):
    "With --min-delta the kept epoch is not the lowest val MAE of the history: the report must show the kept one."
    hist = json.loads((run_copy / 'history.json').read_text())
    hist[0]['val_mae'], hist[1]['val_mae'] = 20.0, 19.5          # 19.5 did not beat 20 by min_delta 1
    (run_copy / 'history.json').write_text(json.dumps(hist))
    cfg = json.loads((run_copy / 'config.json').read_text())
    cfg.update(best_epoch=1, best_val_mae=20.0); cfg['training']['min_delta'] = 1.0
    (run_copy / 'config.json').write_text(json.dumps(cfg))
    t = text_of(curves_section(load_run(run_copy)))
    assert 'best epoch 1: val MAE 20.000' in t and '2: val MAE 19.500 , val RMSE' not in t, t
    cfg['status'] = 'failed'; (run_copy / 'config.json').write_text(json.dumps(cfg))
    assert 'best validation MAE 20.000 at epoch 1' in text_of(header_section(load_run(run_copy)))


def test_report_split_ages_are_per_subject(run_copy):
    "config.json's age_summary is over subjects; the report's table was over images (each subject counted once per image)."
    cfg = json.loads((run_copy / 'config.json').read_text())
    t = text_of(dataset_section(load_run(run_copy)))
    for s in ('train', 'val', 'test'):
        a = cfg['dataset']['age_summary'][s]
        assert f'{s} {cfg["dataset"][f"{s}_samples"]} {cfg["dataset"][f"{s}_subjects"]} {a["mean"]:.1f} {a["sd"]:.1f}' in t, (s, t)
    assert 'one age per subject' in t


@pytest.mark.parametrize('name,content,why', [
    ('history.json', '[{"epoch": 1, "val_m', 'history.json'),
    ('metrics.json', '{oops', 'metrics.json'),
    ('predictions.csv', 'path,age\n', 'predictions.csv'),
])
def test_report_refuses_a_corrupt_file(run_copy, name, content, why):
    (run_copy / name).write_text(content)
    with pytest.raises(InputError, match=re.escape(why)):
        render_report(run_copy)
    assert not (run_copy / 'report.html').exists()
    r = agenb('report', run_copy)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and why in r.stderr, r.stderr


def test_report_refuses_predictions_that_disagree_with_metrics(run_copy):
    m = json.loads((run_copy / 'metrics.json').read_text()); m['overall']['mae'] += 0.5
    (run_copy / 'metrics.json').write_text(json.dumps(m))
    with pytest.raises(InputError, match='predictions.csv gives a test MAE'):
        render_report(run_copy)
