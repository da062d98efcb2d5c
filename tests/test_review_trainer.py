"""Review of the trainer's neighbours on a --subject-views run: every command that reads such a run (one pooled
prediction per subject) must read it as one, count its images right, and not fail."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY, agenb, run_dir_of


@pytest.fixture(scope='module')
def views_run(data_args, tmp_path_factory):
    "A 1-epoch --subject-views 3 run at 32 px on the shared synthetic data (Healthy cohort)."
    r = agenb('train', *data_args, *TINY, '--epochs', '1', '--warmup-epochs', '0', '--image-size', '32',
              '--subject-views', '3', '--gradcam-n', '0', '--no-report', '--output-dir', tmp_path_factory.mktemp('views'),
              proc=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir_of(r)


def test_agegap_of_a_subject_views_run(views_run, synth_root, tmp_path):
    """agenb.agegap on a --subject-views run: each clinical subject's gap comes from its images pooled (as predict gives
    it), and both groups count their images (it failed with KeyError on the second image of a subject)."""
    r = agenb('agegap', views_run, '--image-dir', synth_root / 'TA' / 'Pathological' / 'Images', '--out', tmp_path / 'gap',
              '--n-boot', '100', '--no-run-report')
    assert r.returncode == 0, r.stderr[-3000:]
    subj = pd.read_csv(tmp_path / 'gap' / 'agegap.csv', dtype={'subject': str})
    p = agenb('predict', views_run, '--image-dir', synth_root / 'TA' / 'Pathological' / 'Images', '--out', tmp_path / 'p.csv')
    assert p.returncode == 0, p.stderr[-3000:]
    pooled = pd.read_csv(tmp_path / 'p.csv', dtype={'subject': str}).set_index('subject')
    clin = subj[subj.group != 'Healthy test'].set_index('subject')
    assert len(clin) == len(pooled)
    np.testing.assert_allclose(clin.pred.to_numpy(), pooled.loc[clin.index, 'pred'].to_numpy(), atol=1e-4)
    assert (clin.n_images == pooled.loc[clin.index, 'n_images']).all()
    split = pd.read_csv(views_run / 'split.csv', dtype={'subject': str})
    per = split[split.split == 'test'].groupby('subject').size()
    healthy = subj[subj.group == 'Healthy test'].set_index('subject')
    assert len(healthy) == len(per) and (healthy.n_images == per.loc[healthy.index]).all()


def test_subject_views_metrics_count_the_test_images(views_run, tmp_path):
    """metrics.json of a --subject-views run (one pooled prediction per subject) counts the test images, not the rows:
    the report's headline said "on 5 images of 5 subjects" for 15 test images; subject_predictions.csv said 1 image each."""
    split = pd.read_csv(views_run / 'split.csv', dtype={'subject': str})
    test = split[split.split == 'test']
    per = test.groupby('subject').size()
    for folder in (views_run, None):
        if folder is None:   # agenb.evaluate RUN_DIR: the same numbers in its own folder
            r = agenb('evaluate', views_run, '--out', tmp_path / 'ev')
            assert r.returncode == 0, r.stderr[-3000:]
            folder = tmp_path / 'ev'
        m = json.loads((folder / 'metrics.json').read_text())
        assert (m['n_images'], m['n_subjects'], m['n_predictions']) == (len(test), len(per), len(per))
        s = pd.read_csv(folder / 'subject_predictions.csv', dtype={'subject': str}).set_index('subject')
        assert (s.n_images == per.loc[s.index]).all()


def test_grad_cam_without_weight_is_not_a_failure(data_args, tmp_path):
    "A model whose Grad-CAM maps are all zero has no shortcut score: logged as such, not as 'Grad-CAM failed'."
    r = agenb('train', *data_args, *TINY, '--covariates', 'sex,bmi', '--image-size', '32', '--lr', '1e-2',
              '--output-dir', tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = run_dir_of(r)
    cfg, log = json.loads((run / 'config.json').read_text()), (run / 'train.log').read_text()
    assert 'gradcam_error' not in cfg and 'Grad-CAM failed' not in log, log[-2000:]
    score = json.loads((run / 'metrics.json').read_text())['shortcut_score']
    assert ('n/a (no map has any weight)' in log) == (score is None), (score, log[-500:])
