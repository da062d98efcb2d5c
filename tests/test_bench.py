"""The committed benchmark results: provenance recorded, no machine paths, and bench/README.md's figures rendered
from them (bench/render.py), so that the two cannot disagree."""
import importlib.util, json, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'bench'))
import render  # noqa: E402

import numpy as np
import pytest

RES = json.loads((ROOT / 'bench' / 'results.json').read_text())
# bench/results.json is committed from a full `make bench` of a fresh clone of the commit it names (one to two hours on a
# quiet 2-core machine, most of it the 40-epoch accuracy trainings).


def test_readme_figures_are_rendered_from_results():
    text = (ROOT / 'bench' / 'README.md').read_text()
    assert render.fill(text, 'results', render.bench_block(RES)) == text, \
        'bench/README.md disagrees with bench/results.json: run python bench/render.py'
    readme = (ROOT / 'README.md').read_text()
    assert '<!-- bench:begin -->' in readme and render.fill(readme, 'bench', render.summary(RES)) == readme, \
        'README.md disagrees with bench/results.json: run python bench/render.py --readme nbs/index.ipynb, then make readme'


def test_results_record_code_and_data():
    from agenb.synth import GENERATOR_VERSION
    assert len(RES['agenb']['commit']) == 40 and RES['agenb']['dirty'] is False
    fp = RES['data']['fingerprint']
    assert fp['files_match'] and len(fp['content_sha256']) == 64
    if fp['version'] != GENERATOR_VERSION:   # the README must say that the figures predate the current generator
        assert 'predate the current generator' in render.summary(RES) and 'predate' in (ROOT / 'README.md').read_text()
    assert fp['params']['subjects'] == 400 and not RES['quick']
    for k in ('mae_over_oracle', 'mae_over_plain_loop', 'mae_over_baseline'): assert RES[k] > 0


def test_no_absolute_paths():
    def strings(o):
        if isinstance(o, dict): yield from (s for v in o.values() for s in strings(v))
        elif isinstance(o, list): yield from (s for v in o for s in strings(v))
        elif isinstance(o, str): yield o
    bad = [s for s in strings(RES) if s.startswith('/') or '/work/' in s or '/tmp/' in s or '/home/' in s]
    assert not bad, bad


def test_fill_replaces_only_the_block():
    t = 'a\n<!-- x:begin -->\nold\n<!-- x:end -->\nb\n'
    assert render.fill(t, 'x', 'new') == 'a\n<!-- x:begin -->\nnew\n<!-- x:end -->\nb\n'


def test_models_table_is_rendered_from_its_results():
    "bench/README.md's models table (issue 16) is bench/models_results.json's, and the combination was chosen on validation."
    import models_bench
    res = json.loads((ROOT / 'bench' / 'models_results.json').read_text())
    text = (ROOT / 'bench' / 'README.md').read_text()
    assert render.fill(text, 'models', models_bench.models_block(res)) == text, \
        'bench/README.md disagrees with bench/models_results.json: run python bench/models_bench.py --only combined'
    rows = res['rows']
    assert set(models_bench.ROWS) <= set(rows) and 'combined' in rows
    assert res['combined_of'] == [k for k in models_bench.ROWS if k != 'plain' and rows[k]['val_subject_mae'] < rows['plain']['val_subject_mae']]
    assert res['agenb']['dirty'] is False and len(res['agenb']['commit']) == 40
    C = RES['accuracy'].get('combined') or {}
    from agenb.synth import GENERATOR_VERSION   # a results.json of older data says so (test_results_record_code_and_data),
    stale = RES['data']['fingerprint']['version'] != GENERATOR_VERSION   # and a table re-run on today's data may differ
    assert C.get('of') == res['combined_of'] or C.get('skipped') or stale, 'make bench\'s combined row is not the models table\'s combination'


def test_models_row_over_seeds_is_the_mean_with_seed_and_subject_intervals():
    "A models-table row over two seeds: each figure the mean, intervals resampling seeds and subjects; other subjects refused."
    import models_bench as M
    import pandas as pd
    subj = [f's{i}' for i in range(30)]
    rng = np.random.default_rng(0)
    oracle = pd.Series(rng.uniform(2, 6, 30), index=subj)
    def run(seed, shift):
        err = pd.Series(rng.uniform(3, 9, 30) + shift, index=subj)
        r = {k: float(err.mean()) for k in M.MEANS}
        r.update({k: 1 for k in M.SAME}, oracle_subject_mae=float(oracle.mean()), best_epoch=seed, wall_seconds=10.0, run_dir=f'r{seed}')
        return r, pd.DataFrame({'err': err, 'oracle_err': oracle})
    a, b = run(1, 0.0), run(2, 4.0)
    row = M.seeds_row([a, b], (1, 2), n_boot=500)
    assert row['subject_mae'] == round((a[0]['subject_mae'] + b[0]['subject_mae']) / 2, 3)
    lo, hi = row['subject_mae_ci95']
    assert lo < row['subject_mae'] < hi
    one = M.seeds_row([a], (1,), n_boot=500)['subject_mae_ci95']          # the seeds' spread widens the interval
    assert hi - lo > one[1] - one[0]
    assert row['wall_seconds'] == 20.0 and [p['seed'] for p in row['per_seed']] == [1, 2] and row['run_dir'] == 'r1'
    c = (b[0], b[1].rename(index=lambda s: s + 'x'))
    with pytest.raises(SystemExit, match='other test subjects') as e: M.seeds_row([a, c], (1, 2))
    assert e.value.code == 2                                        # a refusal, as agenb's bad-input exit


@pytest.fixture(scope='module')
def DEMO():
    return json.loads((ROOT / 'bench' / 'demo_record.json').read_text())


def test_readme_demo_block_is_rendered_from_the_recorded_demo(DEMO):
    "The README's demo MAE and duration are bench/demo.py's record of a real `make demo`, not typed."
    readme = (ROOT / 'README.md').read_text()
    assert '<!-- demo:begin -->' in readme and render.fill(readme, 'demo', render.demo_block(DEMO)) == readme, \
        'README.md disagrees with bench/demo_record.json: run python bench/demo.py (it re-renders nbs/index.ipynb and README.md)'
    assert f"MAE {DEMO['mae']:.2f} years" in readme


def test_demo_record_names_code_data_and_machine(DEMO):
    from agenb.synth import GENERATOR_VERSION
    assert len(DEMO['agenb']['commit']) == 40 and DEMO['agenb']['dirty'] is False
    assert DEMO['data']['synth_version'] == GENERATOR_VERSION, 'the demo data changed: run python bench/demo.py again'
    assert DEMO['machine']['cpu_model'] and DEMO['seconds'] > 0 and 0 < DEMO['mae'] < DEMO['baseline_mae']
    assert len(DEMO['cpu_spread']) >= 2 and not DEMO['run'].startswith('/')


def test_defaults_leaderboards_are_rendered_into_their_readme():
    "bench/defaults/README.md's tables are the committed leaderboards of the defaults' experiments."
    import importlib.util
    spec = importlib.util.spec_from_file_location('defaults_render', ROOT / 'bench' / 'defaults' / 'render.py')
    d = importlib.util.module_from_spec(spec); spec.loader.exec_module(d)
    text = (ROOT / 'bench' / 'defaults' / 'README.md').read_text()
    assert {'lr_scratch', 'augment', 'selection'} <= set(d.EXPERIMENTS)
    for name in d.EXPERIMENTS:
        assert (ROOT / 'bench' / 'defaults' / d.SOURCES[name]).is_file()
        assert f'<!-- {name}:begin -->' in text, f'bench/defaults/README.md has no table for {name}'
        assert render.fill(text, name, d.table(name)) == text, 'run python bench/defaults/render.py'
    assert 'augment' in d.FINALS
    for name in d.FINALS:
        assert render.fill(text, f'{name}_final', d.final_table(name)) == text, 'run python bench/defaults/render.py'
        f = json.loads((ROOT / 'bench' / 'defaults' / f'{name}_final.json').read_text())
        assert f['opening'] == 1 and len(f['single']) >= 2 and f['ensemble']['n_test_subjects'] == f['ensemble_vs_single']['n']


# A bench script's end-to-end check that trains an experiment (about 75 s on 2 cores): `make test-all` runs it,
# `make test` does not. The script is bench code, not agenb's: a broken one fails its own bench run, not a user's result.
@pytest.mark.slow
def test_selection_scores_each_rule_on_the_same_fold_runs(tmp_path, synth_root):
    """bench/defaults/selection.py on a tiny experiment (one variant, 2 folds, 3 epochs, a checkpoint every epoch):
    `best` reproduces the experiment's own OOF predictions, `last` is the last epoch's checkpoint, each rule covers the
    same images, and the leaderboard ranks the four rules against `best`."""
    import importlib.util, yaml
    import numpy as np, pandas as pd
    from conftest import agenb
    from agenb.predict import predict_images
    from agenb.runs import load_run_model
    spec = {'name': 'sel', 'data': {'image_dir': str(synth_root / 'TA' / 'Healthy' / 'Images'),
                                    'excel_path': str(synth_root / 'TA' / 'characteristics.xlsx')},
            'base': {'arch': 'resnet18', 'pretrained': False, 'image_size': 32, 'epochs': 3, 'batch_size': 16,
                     'num_workers': 1, 'warmup_epochs': 0, 'lr': 1.0e-3, 'report': False, 'gradcam_n': 0,
                     'checkpoint_every': 1, 'keep_checkpoints': 3},
            'variants': [{'name': 'v'}], 'folds': 2, 'seeds': [1], 'test_size': 0.2, 'split_seed': 42, 'bootstrap': 200}
    (tmp_path / 'sel.yaml').write_text(yaml.safe_dump(spec, sort_keys=False))
    r = agenb('experiment', 'run', tmp_path / 'sel.yaml', '--out', tmp_path / 'exp', '--workers', '1', '--engine', 'cli', timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    s = importlib.util.spec_from_file_location('selection', ROOT / 'bench' / 'defaults' / 'selection.py')
    sel = importlib.util.module_from_spec(s); s.loader.exec_module(sel)
    oof = sel.selection_oof(tmp_path / 'exp', 'v')
    exp_oof = pd.read_csv(tmp_path / 'exp' / 'oof_predictions.csv', dtype={'subject': str})
    assert sorted(set(oof.variant)) == sorted(sel.RULES) and len(oof) == 4 * len(exp_oof)
    for rule, g in oof.groupby('variant'):
        assert list(g.file) == list(exp_oof.file) and np.isfinite(g.prediction).all()
    np.testing.assert_allclose(oof[oof.variant == 'best'].prediction.to_numpy(), exp_oof.prediction.to_numpy(), atol=1e-3)
    run = sel.run_dir_of(tmp_path / 'exp', 'v', 1, 1)
    assert sel.last_checkpoint(run) == 'checkpoint_epoch_0003.pth'
    f1 = exp_oof[exp_oof.fold == 1]
    paths = pd.read_csv(run / 'predictions.csv').set_index('filename').loc[f1.file, 'path'].tolist()
    last = predict_images(load_run_model(run, 'checkpoint_epoch_0003.pth'), paths, intervals=False)[0].pred.to_numpy()
    np.testing.assert_allclose(oof[(oof.variant == 'last') & (oof.fold == 1)].prediction.to_numpy(), last, atol=1e-6)
    oof.to_csv(tmp_path / 'sel_oof.csv', index=False)
    from agenb.exp_report import compare_oof
    board = compare_oof(tmp_path / 'sel_oof.csv', 'best')[0]
    assert set(board.variant) == set(sel.RULES) and (board.baseline == 'best').all()
    # a run that did not train every epoch has no "last epoch" to score
    cfg = json.loads((run / 'config.json').read_text()); cfg['epochs_completed'] = 2
    (run / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match='stopped after 2 of 3 epochs') as e: sel.last_checkpoint(run)
    assert e.value.code == 2


def test_accuracy_block_is_rendered_and_recorded():
    """The accuracy details (the newer of make bench's own results and bench/accuracy_results.json, the section run
    alone, among those on the current data: `render.detail_source`) are what bench/README.md and the README show, measured on the current generator's data, and a dirty tree
    names its files, none of them code."""
    from agenb.synth import GENERATOR_VERSION
    src = render.detail_source('accuracy', RES)
    assert src is not None, 'neither bench/results.json nor bench/accuracy_results.json holds the current accuracy section'
    acc = src[1]
    assert acc['data']['fingerprint']['version'] == GENERATOR_VERSION and acc['data']['fingerprint']['files_match']
    assert len(acc['agenb']['commit']) == 40 and acc['accuracy']['plain_loop']['n_test_images'] == acc['accuracy']['n_test_images']
    if acc['agenb']['dirty']:
        files = acc['agenb']['dirty_files']
        assert files and not [f for f in files if f.startswith(('agenb/', 'nbs/', 'settings.ini', 'requirements'))], files
    block = render.accuracy_block(acc, src[0].name)
    for path in (ROOT / 'bench' / 'README.md', ROOT / 'README.md'):
        assert render.fill(path.read_text(), 'accuracy', block) == path.read_text(), f'run python bench/render.py --readme nbs/index.ipynb, then make readme ({path})'
    S = acc['accuracy'].get('seeds')
    upper, oracle = ((S['mae_over_plain_loop_ci95'][1], S['mae_over_oracle']) if S else
                     (acc['accuracy']['ratio_ci95']['mae_over_plain_loop'][1], acc['accuracy']['mae_over_oracle']))
    assert ('not met' in block) == (upper >= 1.0 or oracle > 1.20)


def test_detail_source_is_the_newer_current_record(tmp_path, monkeypatch):
    """The accuracy details come from make bench's own results or from the section run alone, whichever is newer among
    those measured on the current generator's data; a record on older data is used only when nothing current is."""
    from agenb.synth import GENERATOR_VERSION
    rec = lambda version, date: {'data': {'fingerprint': {'version': version}}, 'machine': {'date': date},
                                 'accuracy': {'seeds': {'per_seed': []}}}
    alone = tmp_path / 'accuracy_results.json'
    monkeypatch.setattr(render, 'ACCURACY', alone)
    res = rec(GENERATOR_VERSION, '2026-12-06T10:00:00')
    assert render.detail_source('accuracy', res)[0] == render.RESULTS             # nothing run alone
    alone.write_text(json.dumps(rec(GENERATOR_VERSION, '2026-12-07T10:00:00')))
    assert render.detail_source('accuracy', res)[0] == alone                      # run alone later: the newer
    alone.write_text(json.dumps(rec(GENERATOR_VERSION - 1, '2026-12-07T10:00:00')))
    assert render.detail_source('accuracy', res)[0] == render.RESULTS             # newer, but on older data
    stale = rec(GENERATOR_VERSION - 1, '2026-12-05T10:00:00')
    alone.write_text(json.dumps(rec(GENERATOR_VERSION, '2026-12-01T10:00:00')))
    assert render.detail_source('accuracy', stale)[0] == alone                    # older, but on the current data
    alone.unlink()
    assert render.detail_source('accuracy', {'data': {}}) is None


def test_summary_marks_each_target():
    """The README summary says 'met' or 'not met' beside each ratio issue 27 sets a target for, from the figures: a
    plain-loop ratio whose interval ends below 1.0, and ratios to the oracle of at most 1.20 (one model and the fold
    ensemble)."""
    S = dict(per_seed=[{}, {}], test_mae_mean=7.0, plain_test_mae_mean=7.5, mae_over_plain_loop=0.93,
             mae_over_plain_loop_ci95=[0.88, 0.99], mae_over_oracle=1.15, mae_over_oracle_ci95=[1.05, 1.25])
    one = dict(mae_over_oracle=1.19, mae_over_oracle_ci95=[1.1, 1.3])
    res = dict(accuracy=dict(settings={}, seeds=S), data={'fingerprint': {}},
               ensemble=dict(options=dict(image_size=64, epochs=20), single=one,
                             fold_ensemble=dict(n_models=10, mae_over_oracle=1.21, mae_over_oracle_ci95=[1.1, 1.3])))
    row = lambda start: next(l for l in render.summary(res).splitlines() if l.startswith('| ' + start))
    assert row('`mae_over_plain_loop`').endswith(': met |') and row('`mae_over_oracle`').endswith(': met |')
    assert row('over the oracle at 64 px').endswith('1.19 [1.10, 1.30]: met / 1.21 [1.10, 1.30]: **not met** |')
    S['mae_over_plain_loop_ci95'][1], S['mae_over_oracle'] = 1.0, 1.21
    assert row('`mae_over_plain_loop`').endswith('**not met** |') and row('`mae_over_oracle`').endswith('**not met** |')


def _bench_run():
    spec = importlib.util.spec_from_file_location('bench_run', ROOT / 'bench' / 'run.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod



def test_a_bench_refusal_is_one_line_and_exit_2(capsys):
    "bench/run.py's `refuse`: the bench scripts stop on input they cannot use as agenb's commands do."
    B = _bench_run()
    with pytest.raises(SystemExit) as e: B.refuse('gap: the split of 320 subjects\n is no longer the one')
    assert e.value.code == 2 and str(e.value) == 'gap: the split of 320 subjects is no longer the one'
    assert capsys.readouterr().err == 'gap: the split of 320 subjects is no longer the one\n'
    r = subprocess.run([sys.executable, '-c', 'import sys; sys.path.insert(0, "bench"); import run; run.refuse("x: stale")'],
                       cwd=ROOT, capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (2, 'x: stale\n'), r.stderr[-500:]

def _cubes(rng, factor=1.0, n=80, seeds=3, noise=2.3, shift=0.1):
    "Per-subject error sums of agenb and the plain loop (`seeds` runs each) and the oracle: agenb's errors x `factor`."
    u = rng.normal(0, 6, n)                                       # what every predictor gets wrong about a subject
    run = lambda f: f * np.abs(u + rng.normal(0, shift) + rng.normal(0, noise, n))   # + each training's own noise
    return {'agenb': np.stack([run(factor) for _ in range(seeds)]), 'plain': np.stack([run(1.0) for _ in range(seeds)]),
            'oracle': np.abs(u)[None] + 1.0}


def test_seed_averaged_ratios_and_their_false_alarm_rate():
    """bench/run.py's ratios over several training seeds: the point is the ratio of the seed-averaged errors, the interval
    resamples seeds and subjects; and the target rule ('upper end below 1.0') where nothing differs, simulated with the
    noise measured on the defaults' fold runs (per-subject SD 2.3 years between trainings), fires in at most 5% of
    300 experiments (the nominal one-sided rate is 2.5%), while a 15% better agenb is found in most."""
    B = _bench_run()
    c = {'agenb': np.array([[1.0, 3.0], [3.0, 5.0]]), 'plain': np.array([[4.0, 4.0]]), 'oracle': np.array([[2.0, 2.0]])}
    r = B.seeds_ratios(c, n_boot=200)
    assert (r['mae_over_plain_loop'], r['mae_over_oracle']) == (0.75, 1.5)          # (2 + 4) / (4 + 4), (2 + 4) / (2 + 2)
    lo, hi = r['mae_over_plain_loop_ci95']
    assert lo < 0.75 < hi                                           # the two seeds differ: the interval is not a point
    rng = np.random.default_rng(0)
    alarms = np.mean([B.seeds_ratios(_cubes(rng), n_boot=500, seed=i)['mae_over_plain_loop_ci95'][1] < 1.0 for i in range(300)])
    found = np.mean([B.seeds_ratios(_cubes(rng, 0.85), n_boot=500, seed=i)['mae_over_plain_loop_ci95'][1] < 1.0 for i in range(100)])
    assert alarms <= 0.05 and found > 0.5, (alarms, found)


def _fake_experiment(d, variant, shift, fold_of=None, base=None, protocol=None):
    "An experiment folder as combine.py reads it: OOF rows of one variant (errors `shift` years), its leaderboard row, record and spec."
    import numpy as np, pandas as pd, yaml
    rng = np.random.default_rng(0)
    rows = []
    for seed in (1, 2):
        for s in range(40):
            age = 20 + s
            for k in (1, 2):
                rows.append(dict(variant=variant, seed=seed, fold=(fold_of or (lambda s: s % 4 + 1))(s), subject=str(s),
                                 file=f'anon_{s}_{k}.png', age=age, prediction=age + shift + rng.normal(0, 0.1)))
    d.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(d / 'oof_predictions.csv', index=False)
    pd.DataFrame([{'variant': variant, 'options': json.dumps({'x': shift})}]).to_csv(d / 'leaderboard.csv', index=False)
    (d / 'experiment.json').write_text(json.dumps({'protocol': protocol or {'split_seed': 42, 'folds': 4}, 'test_subjects': ['99'],
                                                   'folds': [], 'data_fingerprint': {'images_sha256': 'a'}}))
    (d / 'spec.yaml').write_text(yaml.safe_dump({'base': base or {'arch': 'resnet18', 'image_size': 64}}))
    return d


def _remove_combined(out):
    "What a combine.py run in a test wrote: its leaderboard `out` and its OOF files under bench/out."
    out.unlink(missing_ok=True)
    for p in (ROOT / 'bench' / 'out').glob('test_combine_tmp_oof*'):
        if p.is_dir(): shutil.rmtree(p)
        else: p.unlink()


def test_combine_pools_only_experiments_of_one_protocol(tmp_path):
    """bench/defaults/combine.py pools variants of experiments that share data, base and protocol into agenb's
    leaderboard, and refuses (exit 2, one line) any that differ in folds, base or protocol."""
    import contextlib, io
    import pandas as pd
    spec = importlib.util.spec_from_file_location('combine_under_test', ROOT / 'bench' / 'defaults' / 'combine.py')
    combine = importlib.util.module_from_spec(spec); spec.loader.exec_module(combine)

    def cmd(*a):   # combine.py's main in this process: 8 interpreters' imports took ~60 s of the test's ~70
        out, err, code = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try: combine.main([str(x) for x in a])
            except SystemExit as e: code = e.code
        return subprocess.CompletedProcess(a, code, out.getvalue(), err.getvalue())

    r = subprocess.run([sys.executable, str(ROOT / 'bench' / 'defaults' / 'combine.py'), '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and '--base-may-differ' in r.stdout, r.stderr   # the script's own entry point
    a = _fake_experiment(tmp_path / 'a', 'base', 0.5)
    b = _fake_experiment(tmp_path / 'b', 'better', 0.1)
    r = cmd('test_combine_tmp', f'{a}:base', f'{b}:better', '--baseline', 'base')
    out = ROOT / 'bench' / 'defaults' / 'test_combine_tmp_leaderboard.csv'
    try:
        assert r.returncode == 0, r.stderr
        board = pd.read_csv(out)
        assert list(board.variant) == ['better', 'base'] and bool(board.distinguishable_from_baseline.iloc[0])
        assert json.loads(board.options.iloc[0]) == {'x': 0.1}
    finally: _remove_combined(out)
    for name, kw, says in (('folds', dict(fold_of=lambda s: (s + 1) % 4 + 1), 'do not share a protocol'),
                           ('base', dict(base={'arch': 'resnet50'}), 'differ in base'),
                           ('protocol', dict(protocol={'split_seed': 7, 'folds': 4}), 'differ in protocol')):
        c = _fake_experiment(tmp_path / name, 'other', 0.1, **kw)
        r = cmd('test_combine_tmp', f'{a}:base', f'{c}:other', '--baseline', 'base')
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
        assert not out.exists()
    # --base-may-differ: a base that differs only in the named key pools, and each row says its value of the key
    ft = _fake_experiment(tmp_path / 'ft', 'tuned', 0.1, base={'arch': 'resnet18', 'image_size': 64, 'weights': 'w.pth'})
    r = cmd('test_combine_tmp', f'{ft}:tuned', f'{a}:base', '--baseline', 'base', '--base-may-differ', 'weights')
    try:
        assert r.returncode == 0, r.stderr
        board = pd.read_csv(out).set_index('variant')
        assert json.loads(board.loc['tuned', 'options']) == {'weights': 'w.pth', 'x': 0.1}
        assert json.loads(board.loc['base', 'options']) == {'weights': None, 'x': 0.5}
    finally: _remove_combined(out)
    one_line = lambda r, says: r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cmd('test_combine_tmp', f'{ft}:tuned', f'{a}:base', '--baseline', 'base')        # without the flag: refused
    assert one_line(r, 'differ in base') and not out.exists(), r.stderr
    c = _fake_experiment(tmp_path / 'arch', 'other', 0.1, base={'arch': 'resnet50', 'image_size': 64, 'weights': 'w.pth'})
    r = cmd('test_combine_tmp', f'{a}:base', f'{c}:other', '--baseline', 'base', '--base-may-differ', 'weights')
    assert one_line(r, 'differ in base') and not out.exists(), r.stderr   # only the named key may differ
    r = cmd('test_combine_tmp', f'{ft}:tuned', f'{a}:base', '--baseline', 'base', '--base-may-differ', 'weight')
    assert one_line(r, 'misspelt') and not out.exists(), r.stderr          # a key no base has


def test_combine_with_base_adds_the_base_key_and_keeps_the_variants_own(tmp_path):
    "combine.with_base: a variant's own value of a key wins over its base's; a variant without options gets the key alone."
    import yaml
    spec = importlib.util.spec_from_file_location('combine', ROOT / 'bench' / 'defaults' / 'combine.py')
    c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)
    (tmp_path / 'spec.yaml').write_text(yaml.safe_dump({'base': {'weights': 'w.pth', 'lr': 0.1}}))
    assert json.loads(c.with_base('{"weights": "own.pth", "lr": 1}', tmp_path, ['weights'])) == {'lr': 1, 'weights': 'own.pth'}
    assert json.loads(c.with_base('{"lr": 1}', tmp_path, ['weights'])) == {'lr': 1, 'weights': 'w.pth'}
    for none in (None, float('nan')): assert json.loads(c.with_base(none, tmp_path, ['weights'])) == {'weights': 'w.pth'}
    assert c.with_base('{"lr": 1}', tmp_path, []) == '{"lr": 1}'


def _fake_final(tmp_path):
    "A data folder's synth_latents.csv and an experiment's final/ folder (two single models, the fold ensemble) with its record."
    import pandas as pd
    files = [f'anon_{s}_{k}.png' for s in (1, 2, 3) for k in (1, 2)]
    subj = [f.split('_')[1] for f in files]
    age = [10.0 * int(s) for s in subj]
    root = tmp_path / 'data'; root.mkdir()
    pd.DataFrame({'muscle': 'TA', 'cohort': 'Healthy', 'filename': files, 'subject': subj, 'age': age,
                  'oracle_pred': [a + 2 for a in age]}).to_csv(root / 'synth_latents.csv', index=False)
    pd.DataFrame({'muscle': 'GM', 'cohort': 'Healthy', 'filename': files[:1], 'subject': '1', 'age': 10.0,
                  'oracle_pred': 99.0}).to_csv(root / 'synth_latents.csv', mode='a', header=False, index=False)   # another muscle
    exp = tmp_path / 'exp'
    for d, err in (('final/recipe_s1/run_1', 4.0), ('final/recipe_s2/run_2', -6.0), ('final/recipe_ensemble', 3.0)):
        (exp / d).mkdir(parents=True)
        pd.DataFrame({'path': files, 'filename': files, 'subject': subj, 'age': age,
                      'pred': [a + err for a in age]})[::-1].to_csv(exp / d / 'predictions.csv', index=False)
    final = {'single': [{'seed': 1, 'run_dir': 'final/recipe_s1/run_1'}, {'seed': 2, 'run_dir': 'final/recipe_s2/run_2'}],
             'single_mean': 5.0, 'ensemble': {'dir': 'final/recipe_ensemble', 'n_models': 10, 'test_subject_mae': 3.0},
             'ensemble_vs_single': {'diff': -2.0, 'ci_low': -2.5, 'ci_high': -1.5}, 'opening': 1}
    return root, exp, final


def test_ensemble_figures_score_each_model_against_the_oracle(tmp_path):
    """bench/run.py's `ensemble` section: the single models' image MAE is the mean over their seeds, each model's MAE is
    over the oracle's on the same test images (the TA healthy rows of synth_latents.csv, matched by file name whatever
    the order), and `final`'s paired difference is passed on as it is; other test images are refused."""
    import pandas as pd
    B = _bench_run()
    root, exp, final = _fake_final(tmp_path)
    r = B.ensemble_figures(exp, final, root, n_boot=200)
    assert (r['n_test_images'], r['n_test_subjects'], r['oracle_test_mae']) == (6, 3, 2.0)
    assert r['single']['test_mae_per_seed'] == [4.0, 6.0] and r['single']['test_mae'] == 5.0
    assert (r['single']['mae_over_oracle'], r['fold_ensemble']['mae_over_oracle']) == (2.5, 1.5)
    lo, hi = r['single']['mae_over_oracle_ci95']
    assert lo < 2.5 < hi and r['fold_ensemble']['mae_over_oracle_ci95'] == [1.5, 1.5]   # errors constant: no spread
    assert r['ensemble_minus_single_subject_mae'] == {'diff': -2.0, 'ci_low': -2.5, 'ci_high': -1.5}
    p = exp / 'final/recipe_s2/run_2/predictions.csv'
    pd.read_csv(p).iloc[1:].to_csv(p, index=False)
    with pytest.raises(AssertionError, match='other test images'): B.ensemble_figures(exp, final, root, n_boot=50)


def test_ensemble_block_is_rendered_from_its_results():
    """The fold ensemble beside single models (section `ensemble` of make bench's own results or of
    bench/ensemble_results.json, the section run alone, as `render.detail_source` picks) is what bench/README.md and the README show, measured on the
    current generator's data by a clean tree, on the accuracy section's test images."""
    from agenb.synth import GENERATOR_VERSION
    src = render.detail_source('ensemble', RES)
    assert src is not None, 'neither bench/results.json nor bench/ensemble_results.json holds the current ensemble section'
    ens = src[1]
    assert ens['data']['fingerprint']['version'] == GENERATOR_VERSION and not ens['quick']
    assert not ens['agenb']['dirty'] and len(ens['agenb']['commit']) == 40
    assert ens['ensemble']['fold_run_threads'] and all(t['torch_threads'] == 1 for t in ens['ensemble']['fold_run_threads'])
    assert ens['ensemble']['n_test_images'] == render.detail_source('accuracy', RES)[1]['accuracy']['n_test_images']
    block = render.ensemble_block(ens, src[0].name)
    for path in (ROOT / 'bench' / 'README.md', ROOT / 'README.md'):
        assert render.fill(path.read_text(), 'ensemble', block) == path.read_text(), f'run python bench/render.py --readme nbs/index.ipynb, then make readme ({path})'


def _ceiling():
    spec = importlib.util.spec_from_file_location('ceiling', ROOT / 'bench' / 'ceiling.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def test_ceiling_splits_are_nested_with_one_held_out_set(tmp_path, monkeypatch):
    """bench/ceiling.py's data curve: every size's split holds the same held-out test subjects, its development
    subjects hold the smaller sizes' (nested), a tenth of them validate, the rest of the cohort is excluded; a size
    larger than the cohort is refused."""
    import pandas as pd
    C = _ceiling()
    monkeypatch.setattr(C, 'HELD_OUT', 10)
    pd.DataFrame({'subject': [str(i) for i in range(1, 71) for _ in range(2)], 'muscle': 'TA'}).to_csv(tmp_path / 'synth_latents.csv', index=False)
    files = C.split_files(tmp_path, tmp_path, [20, 40])
    s20, s40 = (pd.read_csv(files[n], dtype={'subject': str}).set_index('subject').split for n in (20, 40))
    assert len(s20) == len(s40) == 70
    assert set(s20[s20 == 'test'].index) == set(s40[s40 == 'test'].index) and (s20 == 'test').sum() == 10
    dev20, dev40 = set(s20[s20.isin(['train', 'val'])].index), set(s40[s40.isin(['train', 'val'])].index)
    assert (len(dev20), len(dev40)) == (20, 40) and dev20 < dev40
    assert ((s20 == 'val').sum(), (s40 == 'val').sum(), (s40 == 'excluded').sum()) == (2, 4, 20)
    with pytest.raises(SystemExit, match='fewer than 80') as e: C.split_files(tmp_path, tmp_path, [80])
    assert e.value.code == 2


def test_ceiling_curve_scores_each_size_against_the_oracle_and_the_smallest():
    """Each size's image MAE is the mean over its seeds, over the oracle's and over the smallest size's on the same
    test images (intervals around the point); the rendered block has a row per size."""
    import pandas as pd
    C = _ceiling()
    j = pd.DataFrame({'filename': list('abcdef'), 'subject': ['1', '1', '2', '2', '3', '3'], 'age': 50.0,
                      'oracle': [51.5, 48.5] * 3})                    # oracle MAE 1.5
    rng = np.random.default_rng(0)
    err = lambda e: 50 + e * np.sign(rng.standard_normal(6))
    preds = {320: [err(4.0), err(2.0)], 640: [err(1.5), err(1.5)]}
    c = C.curve(j, preds, n_boot=200)
    r3, r6 = c['sizes']['320'], c['sizes']['640']
    assert (c['oracle_test_mae'], r3['test_mae'], r3['test_mae_per_seed'], r6['test_mae']) == (1.5, 3.0, [4.0, 2.0], 1.5)
    assert (r3['mae_over_oracle'], r6['mae_over_oracle'], r3['mae_over_320'], r6['mae_over_320']) == (2.0, 1.0, 1.0, 0.5)
    assert r3['mae_over_oracle_ci95'][0] < 2.0 < r3['mae_over_oracle_ci95'][1]
    res = {'sizes': [320, 640], 'seeds': [1, 2], 'val_share': 0.1, 'bench_test': c, 'held_out_test': c,
           'spec': 'bench/defaults/augment.yaml', 'variant': 'recipe', 'method': c['method'],
           'recipe_options': {'arch': 'resnet18', 'image_size': 64, 'epochs': 20, 'lr': 0.001},
           'cohort': {'fingerprint': {'version': 4, 'seed': 5}}, 'agenb': {'commit': 'f' * 40, 'dirty': False},
           'machine': {'cpu_model': 'AMD EPYC', 'cores': 2}, 'wall_seconds': 61, 'workers': 2,
           'runs': [{'wall_seconds': 30}, {'wall_seconds': 31.4}]}
    block = C.ceiling_block(res)
    assert '| 320 | 3.00 (4.00, 2.00) | 2.000 [' in block and '(reference)' in block and '| 640 | 1.50 (1.50, 1.50) |' in block and 'clean tree' in block
    assert 'the 2 trainings took 1 min 1 s in all, 2 at a time' in block


def test_ceiling_block_is_rendered_from_its_results():
    """bench/README.md's data curve (bench/ceiling.py) is bench/ceiling_results.json's, measured by a clean tree on the
    current generator's data, on the accuracy section's test images, with every size trained with every seed."""
    from agenb.synth import GENERATOR_VERSION
    C = _ceiling()
    res = json.loads((ROOT / 'bench' / 'ceiling_results.json').read_text())
    text = (ROOT / 'bench' / 'README.md').read_text()
    assert render.fill(text, 'ceiling', C.ceiling_block(res)) == text, 'run python bench/ceiling.py (or render its block again)'
    assert res['agenb']['dirty'] is False and len(res['agenb']['commit']) == 40
    assert res['data']['fingerprint']['version'] == res['cohort']['fingerprint']['version'] == GENERATOR_VERSION
    assert res['cohort']['fingerprint']['seed'] != res['data']['fingerprint']['seed'], 'the cohort must be other people'
    assert res['sizes'] == list(C.SIZES) and sorted((r['n'], r['seed']) for r in res['runs']) == [(n, s) for n in C.SIZES for s in C.SEEDS]
    assert res['bench_test']['n_images'] == render.detail_source('accuracy', RES)[1]['accuracy']['n_test_images']
    assert res['bench_test']['test_filenames_sha256'] == render.detail_source('ensemble', RES)[1]['ensemble']['test_filenames_sha256']
    assert res['data']['fingerprint']['content_sha256'] == RES['data']['fingerprint']['content_sha256'], 'other bench data than make bench\'s'
    assert res['recipe_options']['num_workers'] == 1 and res['recipe_options']['lr'] == C.recipe_options()['lr']
    P = res['plain_loop']
    assert sorted(map(int, P['sizes'])) == list(C.PLAIN_SIZES) and len(P['runs']) == len(C.PLAIN_SIZES) * len(C.SEEDS)
    assert all(p['settings']['epochs'] == res['recipe_options']['epochs'] and p['n_test_images'] == res['held_out_test']['n_images']
               for p in P['runs']), 'the plain loop ran another budget or another test set than the recipe'


def test_ceiling_keeps_a_finished_run_only_for_its_split_and_clean_code(tmp_path, monkeypatch):
    """A finished job's record is kept when its split is unchanged and the tree is clean at the same commit; with
    --from-runs whatever commit trained it; a changed split under --from-runs is an error, not a silent retraining."""
    C = _ceiling()
    split = tmp_path / 'split_20.csv'; split.write_text('subject,split\n1,train\n')
    from agenb.core import file_sha256
    rec = {'n': 20, 'seed': 1, 'run_dir': str(tmp_path / 'run'), 'bench_predictions': str(tmp_path / 'b.csv'), 'wall_seconds': 1.0,
           'split_sha256': file_sha256(split), 'commit': 'a' * 40}
    (tmp_path / 'n20_s1.json').write_text(json.dumps(rec))
    trained = []
    monkeypatch.setattr(C.B, 'run_cli', lambda *a, **k: trained.append(a) or (_ for _ in ()).throw(RuntimeError('trained')))
    for now, from_runs, kept in (({'commit': 'a' * 40, 'dirty': False}, False, True), ({'commit': 'a' * 40, 'dirty': True}, False, False),
                                 ({'commit': 'b' * 40, 'dirty': False}, False, False), ({'commit': 'b' * 40, 'dirty': True}, True, True)):
        monkeypatch.setattr(C, 'git_info', lambda root, now=now: now)
        if kept: assert C.train_and_predict(tmp_path, tmp_path, tmp_path, 20, 1, split, from_runs)['run_dir'] == tmp_path / 'run'
        else:
            with pytest.raises(RuntimeError, match='trained'): C.train_and_predict(tmp_path, tmp_path, tmp_path, 20, 1, split, from_runs)
    split.write_text('subject,split\n1,val\n')
    with pytest.raises(SystemExit, match='no finished record'): C.train_and_predict(tmp_path, tmp_path, tmp_path, 20, 1, split, True)


def test_ceiling_plain_comparison_pairs_each_seed_on_the_held_out_images(tmp_path):
    """The recipe against the plain loop at one size: both sides' predictions of the same held-out images, matched by
    file name, the ratio of the seed-averaged MAEs with an interval around it; a missing image is refused."""
    import pandas as pd
    C = _ceiling()
    j = pd.DataFrame({'filename': list('abcd'), 'subject': ['1', '1', '2', '2'], 'age': 50.0})
    runs, plains = [], []
    for seed, (ea, ep) in {1: (2.0, 4.0), 2: (4.0, 4.0)}.items():
        d = tmp_path / f'run{seed}'; d.mkdir()
        pd.DataFrame({'filename': list('dcba'), 'pred': 50 + ea}).to_csv(d / 'predictions.csv', index=False)
        runs.append({'n': 320, 'seed': seed, 'run_dir': d})
        plains.append({'n': 320, 'seed': seed, 'best_epoch': 3, 'predictions': {f: 50 - ep for f in 'abcd'}})
    r = C.plain_comparison(j, runs, plains, n_boot=200)['320']
    assert (r['agenb_test_mae_per_seed'], r['plain_test_mae_per_seed'], r['mae_over_plain_loop']) == ([2.0, 4.0], [4.0, 4.0], 0.75)
    assert r['mae_over_plain_loop_ci95'][0] < 0.75 < r['mae_over_plain_loop_ci95'][1]
    del plains[0]['predictions']['a']
    with pytest.raises(AssertionError, match='not predicted'): C.plain_comparison(j, runs, plains, n_boot=50)


def _gap():
    spec = importlib.util.spec_from_file_location('gap', ROOT / 'bench' / 'gap.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def test_gap_spacing_image_puts_every_scan_at_one_scale():
    """bench/gap.py's probe: a scan 4 cm deep shrinks to 4/6 of its size, top-aligned and centred on black, so that a
    centimetre spans as many pixels as in a 6 cm scan; a 6 cm scan is unchanged; a depth beyond the reference is refused."""
    from PIL import Image
    G = _gap()
    a = np.zeros((60, 90), np.uint8); a[30:, :] = 200             # bright from 3 cm down in a 6 cm scan of 60 rows
    out = np.asarray(G.spacing_image(Image.fromarray(a), 4.0, 6.0))
    assert out.shape == (60, 90) and (out[40:] == 0).all() and (out[:, :15] == 0).all() and (out[:, 75:] == 0).all()
    assert (out[:19, 15:75] == 0).all() and (out[21:40, 15:75] == 200).all()   # 3 cm of a 4 cm scan: row 20 of 40
    assert (np.asarray(G.spacing_image(Image.fromarray(a), 6.0, 6.0)) == a).all()
    with pytest.raises(ValueError, match='must lie in'): G.spacing_image(Image.fromarray(a), 7.0, 6.0)


def test_gap_tables_find_an_error_that_depends_on_the_depth_setting():
    """By age band, each predictor's MAE is the mean over its seeds beside the oracle's; the children's depth contrast
    is the image-weighted mean signed error at the shallowest depth minus the deepest, with an interval that resamples
    the children, a permutation p-value, and the first model's contrast minus each later one's; zero for a predictor
    whose error does not depend on the depth (the oracle here); the interval's false-alarm rate is measured with the
    depth settings shuffled."""
    import pandas as pd
    G = _gap()
    rows = []
    for i in range(40):                                  # even subjects children, odd adults; 1 to 3 images each
        age, depth = 5.0 + (i % 2) * 50, (4.0, 6.0)[(i // 2) % 2]
        rows += [{'filename': f'{i}_{k}.png', 'subject': str(i), 'age': age, 'depth_cm': depth} for k in range(1 + i % 3)]
    j = pd.DataFrame(rows)
    j['oracle'] = j.age + 1.0                            # off by the same year everywhere: no depth contrast
    child_at_4 = ((j.age < 18) & (j.depth_cm == 4)).to_numpy()
    spread = j.subject.astype(int).to_numpy() % 5 - 2.0           # errors differ between subjects of one group
    e1 = np.where(child_at_4, 6.0, 0.0) + spread
    preds = {'320': [j.age + e1, j.age + e1], '2560': [j.age + spread, j.age + spread]}
    bands = {r['band']: r for r in G.by_age(j, preds)}
    kids = j.age < 18
    assert bands['0-10']['n_images'] == int(kids.sum()) and bands['0-10']['n_subjects'] == 20
    assert bands['0-10']['320'] == round(float(np.abs(e1[kids]).mean()), 2) and (bands['10-18']['n_images'], bands['10-18']['320']) == (0, None)
    d = G.depth_contrast(j, preds, n_boot=300, n_perm=500, n_sim=50)
    assert (d['shallow_cm'], d['deep_cm'], d['n_children'], d['n_subjects']) == (4.0, 6.0, 20, {'4.0': 10, '6.0': 10})
    c = j[kids].assign(e=e1[kids])
    want = c[c.depth_cm == 4].e.mean() - c[c.depth_cm == 6].e.mean()   # per image, not per subject
    r = d['predictors']['320']
    assert r['difference'] == round(float(want), 2) and r['difference_ci95'][0] < r['difference'] < r['difference_ci95'][1]
    assert r['difference_ci95'][1] - r['difference_ci95'][0] > 0.5, 'one seed twice: the width comes from resampling the children'
    assert r['permutation_p'] < 0.01 and d['predictors']['oracle']['permutation_p'] == 1.0   # no shuffle beats a zero contrast
    assert d['predictors']['oracle']['difference'] == 0.0 and 'first_minus_this' not in r
    v = d['predictors']['2560']
    assert v['first_minus_this'] == round(r['difference'] - v['difference'], 2) and v['first_minus_this_ci95'][0] > 0
    fa = d['interval_false_alarm']
    assert (fa['predictor'], fa['n_shuffles'], fa['n_boot']) == ('320', 50, 300) and 0 <= fa['rate'] <= 0.3 and d['n_boot_used'] <= 300
    pw = d['interval_power']['rate_by_shift']
    assert set(pw) == {'3', '6'} and fa['rate'] < pw['3'] <= pw['6'], 'a known contrast must be found more often than none'


def test_gap_block_is_rendered_from_its_results():
    """bench/README.md's gap tables are bench/gap_results.json's, measured by a clean tree from the committed ceiling
    runs, and the probe trained the recipe's options (only its data differ) on the ceiling's smallest split."""
    from agenb.synth import GENERATOR_VERSION
    G = _gap()
    res = json.loads((ROOT / 'bench' / 'gap_results.json').read_text())
    text = (ROOT / 'bench' / 'README.md').read_text()
    assert render.fill(text, 'gap', G.gap_block(res)) == text, 'run python bench/gap.py (or render its block again)'
    ceil = json.loads((ROOT / 'bench' / 'ceiling_results.json').read_text())
    assert res['ceiling_commit'] == ceil['agenb']['commit'] and res['sizes'] == ceil['sizes'] and res['seeds'] == ceil['seeds']
    gits = [r['git'] for p in res['probes'].values() for r in p['runs']]
    assert all(g['dirty'] is False and len(g['commit']) == 40 for g in gits), 'a probe ran on uncommitted code'
    assert res['cohort']['fingerprint']['content_sha256'] == ceil['cohort']['fingerprint']['content_sha256']
    assert res['cohort']['fingerprint']['version'] == GENERATOR_VERSION and res['probes']['probe']['data']['probe_version'] == G.PROBE_VERSION
    assert res['n_images'] == ceil['held_out_test']['n_images'] and sum(r['n_images'] for r in res['by_age']) == res['n_images']
    assert set(res['probes']) == set(G.PROBES)
    seeds = ceil['seeds'] + list(G.EXTRA_SEEDS)
    extra = res['recipe_extra_seeds']
    assert sorted(r['seed'] for r in extra['runs']) == list(G.EXTRA_SEEDS) and extra['options'] == ceil['recipe_options']
    for name, p in res['probes'].items():
        assert p['options'] == {**ceil['recipe_options'], **G.PROBES[name][2]} and sorted(r['seed'] for r in p['runs']) == seeds
        q = p['comparison']
        assert q['seeds'] == seeds and len(q['probe_test_mae_per_seed']) == len(q['recipe_test_mae_per_seed']) == len(seeds)
        assert q['recipe_test_mae_per_seed'][:2] == ceil['plain_loop']['sizes'][str(G.PROBE_SIZE)]['agenb_test_mae_per_seed']


def test_gap_probe_is_trained_again_when_its_data_change(tmp_path, monkeypatch):
    """A finished probe run is kept for the same split, data and changed options, with its predictions and the
    expected options in its config.json, at a clean tree on the same commit (any commit with --from-runs); else it
    is trained again."""
    G = _gap()
    split = tmp_path / 'split_320.csv'; split.write_text('subject,split\n1,train\n')
    from agenb.core import file_sha256
    run = tmp_path / 'run'; run.mkdir()
    (run / 'predictions.csv').write_text('filename,pred\n')
    (run / 'config.json').write_text(json.dumps({'args': {'image_size': 64, 'seed': 1}, 'environment': {'git': {}, 'threads': {}}}))
    expected = {k: (64 if k == 'image_size' else None) for k in G.C.OPTION_KEYS}
    rec = {'n': 320, 'seed': 1, 'run_dir': str(run), 'wall_seconds': 1.0, 'split_sha256': file_sha256(split),
           'probe_content_sha256': 'p' * 64, 'commit': 'a' * 40}
    (tmp_path / 'probe_n320_s1.json').write_text(json.dumps(rec))
    monkeypatch.setattr(G.C, 'train_recipe', lambda *a, **k: (_ for _ in ()).throw(RuntimeError('trained')))
    now = {'commit': 'a' * 40, 'dirty': False}
    monkeypatch.setattr(G, 'git_info', lambda root: now)
    job = lambda sha='p' * 64, changed={}, exp=expected, from_runs=False: G.probe_job('probe', tmp_path, sha, tmp_path, 1, split, changed, exp, from_runs)
    assert job()['run_dir'] == run
    for kw in ({'sha': 'q' * 64}, {'changed': {'image_size': 128}}, {'exp': {**expected, 'image_size': 128}}):
        with pytest.raises(RuntimeError, match='trained'): job(**kw)   # other data, another probe, other options ran
    for state in ({'commit': 'a' * 40, 'dirty': True}, {'commit': 'b' * 40, 'dirty': False}):
        now.update(state)
        with pytest.raises(RuntimeError, match='trained'): job()
        assert job(from_runs=True)['run_dir'] == run
    (run / 'predictions.csv').unlink()
    with pytest.raises(RuntimeError, match='trained'): job(from_runs=True)
    split.write_text('subject,split\n1,val\n'); (run / 'predictions.csv').write_text('filename,pred\n')
    with pytest.raises(RuntimeError, match='trained'): job(from_runs=True)


# A bench script's end-to-end check of two two-rank launches (about 40 s on 2 cores): `make test-all` runs it, `make
# test` does not. Trainer.close, which the bench measures, is tested by tests/test_ddp.py in `make test`.
@pytest.mark.slow
def test_ddp_teardown_bench_records_each_variant(tmp_path):
    """bench/ddp_teardown.py: one two-rank launch per variant (no CPU load) ends cleanly through agenb's Trainer.close,
    and the record names the code, the counts and the exact interval; a run count below 1 is refused with exit 2."""
    out = tmp_path / 'teardown.json'
    r = subprocess.run([sys.executable, 'bench/ddp_teardown.py', '--runs', '1', '--burners', '0', '--out', out],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert set(rec['variants']) == {'left_to_shutdown', 'trainer_close'} and rec['agenb']['commit']
    close, left = rec['variants']['trainer_close'], rec['variants']['left_to_shutdown']
    assert (close['runs'], close['aborted'], close['failed_otherwise'], left['runs'], left['failed_otherwise']) == (1, 0, 0, 1, 0)
    assert close['abort_rate_95ci'][0] == 0 and 0.9 < close['abort_rate_95ci'][1] <= 1     # one run says little
    assert 0 <= rec['fisher_exact_p'] <= 1
    r = subprocess.run([sys.executable, 'bench/ddp_teardown.py', '--runs', '0', '--out', tmp_path / 'x.json'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr.count('\n')) == (2, 1) and '--runs must be at least 1' in r.stderr, r.stderr
    assert not (tmp_path / 'x.json').exists()


def _target_rule():
    spec = importlib.util.spec_from_file_location('target_rule', ROOT / 'bench' / 'target_rule.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def _fake_runs(n_runs=6, n_img=300, seed=0):
    "Signed errors of `n_runs` runs: a method's error per image, a shift each run shares over its images, image noise."
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 6, n_img)
    return mu + rng.normal(0, 1.0, (n_runs, 1)) + rng.normal(0, 2.0, (n_runs, n_img))


def test_target_rule_draws_seeds_that_vary_like_the_runs():
    """bench/target_rule.py's new training seeds: on average the runs' mean error per image; per image, the runs'
    variance; and the shift that a seed shares over its images (the runs' means vary as much); two runs at least."""
    T = _target_rule()
    E = _fake_runs()
    S = T.Method(E).seeds(20000, np.random.default_rng(1))
    assert np.allclose(S.mean(0), E.mean(0), atol=0.1)
    ratio = S.var(0).mean() / E.var(0, ddof=1).mean()
    assert 0.95 < ratio < 1.05
    assert 0.9 < S.mean(1).var() / E.mean(1).var(ddof=1) < 1.1
    assert np.allclose(T.Method(E).scaled(0.5).seeds(3, np.random.default_rng(2)),
                       0.5 * T.Method(E).seeds(3, np.random.default_rng(2)))
    noisy = T.Method(E).scaled(noise=2.0).seeds(20000, np.random.default_rng(1))    # the deviations only
    assert np.allclose(noisy.mean(0), E.mean(0), atol=0.2) and 3.8 < noisy.var(0).mean() / S.var(0).mean() < 4.2
    with pytest.raises(ValueError, match='two runs'): T.Method(E[:1])


def test_target_rule_counts_the_bench_verdicts():
    """Where agenb is twice as good the bench's plain-loop rule says "met" every time, where it is twice as bad
    "worse" every time, and where nothing differs it rarely says either; the oracle rule's point follows the scale."""
    T = _target_rule()
    E = _fake_runs(n_img=240)
    codes = np.repeat(np.arange(80), 3)                  # 80 subjects of 3 images
    m, oracle = T.Method(E), E.mean(0) * 0.8
    good = T.simulate(m.scaled(0.5), m, oracle, codes, n_sims=40, n_boot=200, subjects=40)
    bad = T.simulate(m.scaled(2.0), m, oracle, codes, n_sims=40, n_boot=200, subjects=40)
    null = T.simulate(m, m, oracle, codes, n_sims=200, n_boot=200, subjects=40)
    assert good['plain_rule_met']['rate'] == 1 and good['plain_rule_worse']['rate'] == 0
    assert bad['plain_rule_worse']['rate'] == 1 and bad['plain_rule_met']['rate'] == 0
    assert [b['rate'] for b in good['non_inferior'].values()] == [1, 1] and list(good['non_inferior']) == ['1.05', '1.1']
    assert [b['rate'] for b in bad['non_inferior'].values()] == [0, 0]
    # a margin lets more through than the strict rule, a wider one more still
    assert null['plain_rule_met']['rate'] <= null['non_inferior']['1.05']['rate'] <= null['non_inferior']['1.1']['rate']
    assert null['non_inferior']['1.1']['rate'] > 0.2
    # the oracle's errors are 0.8 of the method's mean error: half of them is well under 1.20, twice them well over
    assert good['oracle_rule_met']['rate'] == 1 and good['oracle_interval_rule_met']['rate'] == 1
    assert bad['oracle_rule_met']['rate'] == 0 and bad['oracle_interval_rule_met']['rate'] == 0
    assert null['plain_rule_met']['rate'] < 0.1 and null['plain_rule_worse']['rate'] < 0.1
    assert abs(null['mae_over_plain_loop']['mean'] - 1) < 0.02
    assert good['mae_over_oracle']['mean'] < null['mae_over_oracle']['mean'] / 1.9
    assert T.binom(5, 100) == {'count': 5, 'n': 100, 'rate': 0.05, 'ci95': [0.0164, 0.1128]}


def test_target_rule_block_is_rendered_from_its_results():
    """bench/README.md's verdict rates are bench/target_rule_results.json's, written by a clean tree, with enough
    simulated benches for a rate near 2.5%; the script refuses fewer."""
    T = _target_rule()
    res = json.loads((ROOT / 'bench' / 'target_rule_results.json').read_text())
    text = (ROOT / 'bench' / 'README.md').read_text()
    assert render.fill(text, 'target_rule', T.target_block(res)) == text, 'run python bench/target_rule.py --render'
    assert res['agenb']['dirty'] is False and res['n_sims'] >= 1000
    assert res['design'] == {**res['design'], 'seeds': 3, 'subjects': 80, 'n_boot': 2000}
    null = res['worlds']['plain_loop_rule'][0]
    assert null['true_mae_over_plain_loop'] == 1.0 and null['plain_rule_met']['n'] == res['n_sims']
    at_margin = {w['true_mae_over_plain_loop']: w['non_inferior'] for w in res['worlds']['plain_loop_rule']}
    assert at_margin[1.05]['1.05']['rate'] < 0.05 and at_margin[1.1]['1.1']['rate'] < 0.05   # false alarms at the margin
    for w in res['worlds']['plain_loop_rule'] + res['worlds']['seed_noise']:     # each world is what it says
        assert abs(w['mae_over_plain_loop']['mean'] - w['true_mae_over_plain_loop']) < 0.01, w
    for w in res['worlds']['oracle_rule']:
        assert abs(w['mae_over_oracle']['mean'] - w['true_mae_over_oracle']) < 0.01, w
        assert w['oracle_interval_rule_met']['rate'] <= w['oracle_rule_met']['rate']    # the upper end is above the point
        if w['true_mae_over_oracle'] >= 1.2: assert w['oracle_interval_rule_met']['rate'] < 0.1, w
    r = subprocess.run([sys.executable, 'bench/target_rule.py', '--sims', '10'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and '--sims 10 is too few' in r.stderr
