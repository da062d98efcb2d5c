"""The committed benchmark results: provenance recorded, no machine paths, and bench/README.md's figures rendered
from them (bench/render.py), so that the two cannot disagree."""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'bench'))
import render  # noqa: E402

import pytest

RES = json.loads((ROOT / 'bench' / 'results.json').read_text())
# bench/results.json is committed from a full `make bench` of a fresh clone of the commit it names (about an hour on a
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
    assert C.get('of') == res['combined_of'] or C.get('skipped'), 'make bench\'s combined row is not the models table\'s combination'


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
    for name in d.EXPERIMENTS:
        assert (ROOT / 'bench' / 'defaults' / f'{name}.yaml').is_file()
        assert render.fill(text, name, d.table(name)) == text, 'run python bench/defaults/render.py'
