"""Invariants as properties (hypothesis, issue 29): what must hold whatever the numbers are.

- View pooling (mean and attention): a subject's prediction does not change when its images are reordered or each is
  listed twice; the pooling weights are >= 0 and sum to one; K views of one image give that image's prediction; a
  subject's prediction does not depend on the other subjects of its batch. In the model, through predict and through
  the ONNX export.
- Out-of-fold coverage: missing, duplicated and extra subjects are each refused.
- The fold ensemble is the mean of its members.
- The distribution head: a distribution concentrated in one bin predicts that bin's centre.
- Bias correction: the identity when the fit is the identity.
Tiny tensors and models, few examples: the file takes well under a minute on one core."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import agenb.exp_final as exp_final
import agenb.exp_jobs as exp_jobs
import agenb.exp_worker as exp_worker
from agenb.gap_stats import subject_gaps
from agenb.core import InputError
from agenb.files import DEFAULT_PATTERN
from agenb.evaluate import apply_bias_correction, fit_bias_correction
from agenb.export import AgeRegressor, export_onnx, load_exported
from agenb.images import Preprocessing
from agenb.model import AgeNet, AgeOutput, DistributionHead, build_model, parse_age_bins
from agenb.predict import predict_images
from agenb.runs import RunModel

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
POOLS = ('mean', 'attention')
S, F = 8, 16   # image side (px), embedding size of the tiny backbone


def tiny_net(pool, outputs=1, seed=0):
    "AgeNet over a tiny backbone (3 x S x S -> F features), eval mode."
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(3 * S * S, F), nn.Tanh())
    return AgeNet(body, F, outputs, dropout=0.5, view_pool=pool).eval()


def images(seed, *shape):
    return torch.randn(*shape, 3, S, S, generator=torch.Generator().manual_seed(seed))


views = st.fixed_dictionaries({'b': st.integers(1, 3), 'k': st.integers(1, 5), 'seed': st.integers(0, 2**16)})


@pytest.fixture(scope='module', params=POOLS)
def net(request): return tiny_net(request.param)


# ---- view pooling in the model --------------------------------------------------------------------------------------------

@SETTINGS
@given(v=views, data=st.data())
def test_pooling_ignores_the_order_of_views(net, v, data):
    x = images(v['seed'], v['b'], v['k'])
    perm = data.draw(st.permutations(range(v['k'])))
    with torch.no_grad(): assert torch.allclose(net(x[:, perm]), net(x), atol=1e-5)


@SETTINGS
@given(v=views, data=st.data())
def test_pooling_ignores_each_view_listed_twice(net, v, data):
    x = images(v['seed'], v['b'], v['k'])
    perm = data.draw(st.permutations(range(2 * v['k'])))        # twice each, in any order
    with torch.no_grad(): assert torch.allclose(net(torch.cat([x, x], 1)[:, perm]), net(x), atol=1e-5)


@SETTINGS
@given(v=views)
def test_k_views_of_one_image_give_that_images_prediction(net, v):
    one = images(v['seed'], v['b'])                              # (B, 3, S, S): no pooling
    with torch.no_grad(): assert torch.allclose(net(one[:, None].expand(-1, v['k'], -1, -1, -1)), net(one), atol=1e-5)


@SETTINGS
@given(v=views)
def test_a_subjects_prediction_does_not_depend_on_its_batch(net, v):
    x = images(v['seed'], v['b'], v['k'])
    with torch.no_grad():
        alone = torch.cat([net(x[i:i + 1]) for i in range(v['b'])])
        assert torch.allclose(net(x), alone, atol=1e-5)


@SETTINGS
@given(v=views)
def test_pooling_weights_are_a_convex_combination(net, v):
    """The pooled embedding (what the head sees) is sum_k w_k f_k over the K views' embeddings f_k with w >= 0 and
    sum w = 1 (mean: each 1/K). The weights are recovered from the model's own tensors (least squares, K <= F)."""
    x = images(v['seed'], v['b'], v['k'])
    seen = {}
    h1 = net.body.register_forward_hook(lambda m, i, o: seen.__setitem__('f', o.detach()))
    h2 = net.drop.register_forward_pre_hook(lambda m, i: seen.__setitem__('pooled', i[0].detach()))
    try:
        with torch.no_grad(): net(x)
    finally: h1.remove(); h2.remove()
    f = seen['f'].double().view(v['b'], v['k'], F)
    for b in range(v['b']):
        A, y = f[b].T.numpy(), seen['pooled'][b].double().numpy()
        w, *_ = np.linalg.lstsq(A, y, rcond=None)
        assert np.allclose(A @ w, y, atol=1e-5)                  # pooled is a combination of the views
        assert abs(w.sum() - 1) < 1e-4 and (w > -1e-4).all(), w
        if net.view_pool == 'mean': assert np.allclose(w, 1 / v['k'], atol=1e-4)


@pytest.mark.parametrize('pool', POOLS)
def test_pooling_of_a_real_backbone(pool):
    "The same invariants with build_model's resnet18 (eval: BatchNorm uses its running statistics)."
    torch.manual_seed(0)
    m = build_model('resnet18', pretrained=False, view_pool=pool).eval()
    x = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m(x)
        assert torch.allclose(m(x[:, [2, 0, 1]]), y, atol=1e-4)
        assert torch.allclose(m(torch.cat([x, x], 1)), y, atol=1e-4)
        assert torch.allclose(m(x[:, :1].expand(-1, 4, -1, -1, -1)), m(x[:, 0]), atol=1e-4)


# ---- view pooling through predict ----------------------------------------------------------------------------------------

def run_model(model, pool=None, head=None, bias_correction=None):
    "An in-memory RunModel of a --subject-views run (`pool`), or of a plain one (None)."
    opts = SimpleNamespace(subject_views=2 if pool else None, view_pool=pool, arch='tiny', num_workers=0, excel_path=None)
    return RunModel(run_dir=Path('tiny'), cfg={'args': {}}, options=opts, model=model, prep=Preprocessing(image_size=S),
                    device=torch.device('cpu'), pattern=DEFAULT_PATTERN, augmentation={}, checkpoint=Path('best_model.pth'),
                    checkpoint_sha256='', epoch=1, val_mae=None, bias_correction=bias_correction, head=head)


subjects = st.lists(st.integers(1, 4), min_size=1, max_size=4)   # images per subject


def decoded(seed, counts):
    "uint8 images (N, 1, S, S) and their file names anon_<subject>_<index>.png."
    names = [Path(f'anon_{s + 1}_{i + 1}.png') for s, n in enumerate(counts) for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (len(names), 1, S, S), generator=g, dtype=torch.uint8), names


def by_subject(rm, imgs, names):
    df, _, _ = predict_images(rm, names, batch_size=3, decoded=(imgs, names), intervals=False)
    assert df['subject'].is_unique
    return df.set_index('subject')['pred'].sort_index()


@SETTINGS
@given(counts=subjects, seed=st.integers(0, 2**16), data=st.data())
def test_predict_pools_a_subjects_images_whatever_their_order_or_repeats(net, counts, seed, data):
    rm = run_model(net, net.view_pool)
    imgs, names = decoded(seed, counts)
    ref = by_subject(rm, imgs, names)
    assert len(ref) == len(counts)
    perm = data.draw(st.permutations(range(len(names))))
    pd.testing.assert_series_equal(by_subject(rm, imgs[perm], [names[i] for i in perm]), ref, atol=1e-5, rtol=0)
    twice = data.draw(st.permutations(range(2 * len(names))))
    both, both_names = torch.cat([imgs, imgs]), names + names
    pd.testing.assert_series_equal(by_subject(rm, both[twice], [both_names[i] for i in twice]), ref, atol=1e-5, rtol=0)


@SETTINGS
@given(k=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_predict_of_k_copies_of_one_image_is_that_images_prediction(net, k, seed):
    imgs, _ = decoded(seed, [1])
    copies = [Path(f'anon_7_{i + 1}.png') for i in range(k)]
    pooled = by_subject(run_model(net, net.view_pool), imgs.expand(k, -1, -1, -1), copies)
    alone = by_subject(run_model(net, net.view_pool), imgs, copies[:1])
    assert np.allclose(pooled.to_numpy(), alone.to_numpy(), atol=1e-5)


# ---- view pooling through the ONNX export -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def exported(net, tmp_path_factory):
    "The net exported as predict's bundle would (AgeRegressor, views input), and run with onnxruntime."
    pytest.importorskip('onnxruntime')
    prep = Preprocessing(image_size=S)
    wrapped = AgeRegressor(net, prep.mean, prep.std, views=True).eval()
    path = tmp_path_factory.mktemp('onnx') / f'{net.view_pool}.onnx'
    export_onnx(wrapped, torch.zeros(1, 2, 1, S, S), path)
    return load_exported(path), wrapped


@settings(SETTINGS, max_examples=10)
@given(v=views, data=st.data())
def test_exported_model_pools_views_whatever_their_order_or_repeats(exported, v, data):
    run, wrapped = exported
    x = torch.rand(v['b'], v['k'], 1, S, S, generator=torch.Generator().manual_seed(v['seed'])).numpy()
    ref = run(x)
    with torch.no_grad(): assert np.allclose(ref, wrapped(torch.from_numpy(x)).numpy(), atol=1e-4)
    perm = data.draw(st.permutations(range(v['k'])))
    assert np.allclose(run(x[:, perm]), ref, atol=1e-4)
    assert np.allclose(run(np.concatenate([x, x], 1)), ref, atol=1e-4)
    assert np.allclose(run(np.repeat(x[:, :1], v['k'], 1)), run(x[:, :1]), atol=1e-4)


# ---- out-of-fold coverage --------------------------------------------------------------------------------------------------

VARIANT = 'lr=0.001'


def fold_frames(folds, seed=0, variant=VARIANT):
    "OOF rows of each fold run (fold k predicts its test subjects), one to three images per subject."
    out = {}
    for k, subs in enumerate(folds, 1):
        rows = [{'variant': variant, 'seed': seed, 'fold': k, 'subject': s, 'file': f'anon_{s}_{i}.png', 'age': 30.0,
                 'prediction': 31.0, 'path': f'/data/anon_{s}_{i}.png'} for s in subs for i in range(1, 1 + int(s) % 3 + 1)]
        out[k] = pd.DataFrame(rows)
    return out


def collect(monkeypatch, folds, frames, variant=VARIANT):
    "`exp_worker.collect_oof` for one variant and seed 0 whose fold runs returned `frames` (database and records stubbed)."
    exp = {'folds': [{'test_subjects': list(s)} for s in folds]}
    spec = {'folds': len(folds), 'seeds': [0]}
    v = {'name': variant, 'kind': 'grid', 'options': {}, 'trial': 0}
    keys = {j.key: j.fold for j in exp_jobs.variant_jobs('exp', spec, v)}
    monkeypatch.setattr(exp_worker, 'read_record', lambda exp_dir, key: {'status': 'completed'})
    monkeypatch.setattr(exp_worker, 'exp_db', lambda exp_dir: SimpleNamespace(job_oof=lambda key: frames[keys[key]]))
    return exp_worker.collect_oof('exp', exp, spec, [v])


@st.composite
def partitions(draw):
    "Development subjects split into 2 to 4 folds (each subject in exactly one), as the fold runs' test subjects."
    subs = draw(st.lists(st.integers(1, 60).map(str), min_size=2, max_size=12, unique=True))
    k = draw(st.integers(2, min(4, len(subs))))
    cuts = sorted(draw(st.lists(st.integers(1, len(subs) - 1), min_size=k - 1, max_size=k - 1, unique=True)))
    return [subs[a:b] for a, b in zip([0, *cuts], [*cuts, len(subs)])]


def refused(monkeypatch, folds, frames):
    with pytest.raises((RuntimeError, InputError)) as e: collect(monkeypatch, folds, frames)
    msg = str(e.value)
    assert VARIANT in msg or exp_jobs.slug(VARIANT) in msg, msg   # names the variant or its fold job


@SETTINGS
@given(folds=partitions(), data=st.data())
def test_oof_covering_every_subject_once_is_accepted_and_anything_else_refused(monkeypatch, folds, data):
    frames = fold_frames(folds)
    oof = collect(monkeypatch, folds, frames)
    assert len(oof) == sum(map(len, frames.values()))
    k = data.draw(st.integers(1, len(folds)))
    subject = data.draw(st.sampled_from(folds[k - 1]))
    # missing: a fold run that lost a subject
    refused(monkeypatch, folds, {**frames, k: frames[k][frames[k].subject != subject]})
    # duplicated: the subject also predicted by another fold's run
    other = data.draw(st.sampled_from([j for j in frames if j != k]))
    dup = frames[k][frames[k].subject == subject].assign(fold=other)
    refused(monkeypatch, folds, {**frames, other: pd.concat([frames[other], dup], ignore_index=True)})
    # duplicated within a fold: an image listed twice
    refused(monkeypatch, folds, {**frames, k: pd.concat([frames[k], frames[k].iloc[:1]], ignore_index=True)})
    # extra: a subject that is not a development subject (a test subject)
    extra = frames[k].iloc[:1].assign(subject='999', file='anon_999_1.png', path='/data/anon_999_1.png')
    refused(monkeypatch, folds, {**frames, k: pd.concat([frames[k], extra], ignore_index=True)})


# ---- the fold ensemble ---------------------------------------------------------------------------------------------------

@SETTINGS
@given(n_models=st.integers(1, 4), counts=subjects, seed=st.integers(0, 2**16), pool=st.sampled_from([None, *POOLS]))
def test_fold_ensemble_is_the_mean_of_its_members(monkeypatch, n_models, counts, seed, pool):
    """`exp_final`'s ensemble of fold models (the rows `predict --variant` writes): per image, `pred` is the mean of
    the members' own predictions, `model_sd` their SD and `n_models` their number."""
    members = {f'run_{i}': run_model(tiny_net(pool, seed=seed + i), pool) for i in range(n_models)}
    imgs, names = decoded(seed, counts)
    paths = [str(Path('/data') / n) for n in names]
    monkeypatch.setattr(exp_final, 'load_run_model', lambda r, device='cpu': members[Path(r).name])
    monkeypatch.setattr(exp_final, 'read_images', lambda p, prep, num_threads=4: (imgs, [Path(x) for x in p], []))
    monkeypatch.setattr(exp_final, 'run_config', lambda r: {'args': {}})
    df = exp_final._ensemble_frame(list(members), '/data', paths, None, 'cpu', 3, 1)
    own = np.stack([predict_images(rm, [Path(p) for p in paths], 3, decoded=(imgs, [Path(p) for p in paths]),
                                   per_image=True, intervals=False)[0]['pred'].to_numpy() for rm in members.values()], 1)
    assert df['path'].tolist() == [str(Path(p).resolve()) for p in paths]
    assert np.allclose(df['pred'], own.mean(1), atol=1e-9)
    assert (df['n_models'] == n_models).all()
    if n_models > 1: assert np.allclose(df['model_sd'], own.std(1, ddof=1), atol=1e-9)
    else: assert df['model_sd'].isna().all()                                    # one model: no spread


# ---- the distribution head -------------------------------------------------------------------------------------------------

class Fixed(nn.Module):
    "A model whose output is the same logits for every input."
    def __init__(self, logits): super().__init__(); self.register_buffer('logits', logits)
    def forward(self, x, *args): return self.logits.expand(len(x), -1)


@st.composite
def bins(draw):
    "Age bins as --age-bins gives them (ages 0 to about 120), a bin to concentrate on, and how sharply."
    width = draw(st.sampled_from([0.5, 1, 2, 5, 10]))
    n = draw(st.integers(2, int(100 / width)))
    return {'start': draw(st.integers(0, 20)), 'width': width, 'n': n, 'at': draw(st.floats(0, 1, exclude_max=True)),
            'scale': draw(st.floats(40, 80))}


@SETTINGS
@given(b=bins())
def test_distribution_concentrated_in_one_bin_predicts_its_centre(b):
    edges = parse_age_bins(f'{b["start"]}:{b["start"] + b["n"] * b["width"]}:{b["width"]}')
    head = DistributionHead(edges, label_sigma=1.0)
    j = int(b['at'] * head.outputs)
    centre = (edges[j] + edges[j + 1]) / 2
    logits = torch.full((1, head.outputs), -b['scale']); logits[0, j] = b['scale']
    tol = 1e-4 * max(1, abs(edges).max())
    assert abs(float(head.age(logits)[0]) - centre) < tol
    s = head.summary(head.probs(logits).numpy())
    assert abs(s['pred'][0] - centre) < tol
    for k in ('lo80', 'hi80', 'lo95', 'hi95'): assert edges[j] - tol <= s[k][0] <= edges[j + 1] + tol, (k, s[k][0])
    assert abs(s['pred_sd'][0] - b['width'] / 12 ** 0.5) < tol                     # uniform within the bin
    x = torch.zeros(2, 3, S, S)
    with torch.no_grad():
        assert torch.allclose(AgeOutput(Fixed(logits), head)(x)[:, 0], torch.tensor(centre, dtype=torch.float32), atol=tol)
        age, sd = AgeRegressor(Fixed(logits), (0, 0, 0), (1, 1, 1), head=head)(x[:, :1])
    assert torch.allclose(age, torch.tensor(centre, dtype=torch.float32), atol=tol)
    assert torch.allclose(sd, torch.tensor(b['width'] / 12 ** 0.5, dtype=torch.float32), atol=tol)


# ---- bias correction -------------------------------------------------------------------------------------------------------

ages = st.lists(st.floats(1, 95), min_size=3, max_size=30).filter(lambda a: np.ptp(a) > 1)
preds = st.lists(st.floats(-10, 120), min_size=1, max_size=20)


@SETTINGS
@given(val=ages, pred=preds)
def test_bias_correction_fitted_on_perfect_predictions_is_the_identity(val, pred):
    fit = fit_bias_correction(val, val)
    assert fit['applied'] and abs(fit['a'] - 1) < 1e-9 and abs(fit['b']) < 1e-7
    assert np.allclose(apply_bias_correction(pred, fit), pred, atol=1e-6)
    img = pd.DataFrame({'subject': [str(i % 3) for i in range(len(pred))], 'age': 50.0, 'pred': pred})
    g = subject_gaps(img, fit, 'Healthy test')                                    # the age-gap's use of it
    assert np.allclose(g['corrected'], g['pred'], atol=1e-6) and np.allclose(g['gap_corrected'], g['gap'], atol=1e-6)


@SETTINGS
@given(val=ages, a=st.floats(0.2, 2), b=st.floats(-30, 30))
def test_bias_correction_undoes_an_exact_linear_bias(val, a, b):
    "pred = a * age + b exactly on validation: the correction maps every such prediction back to its age."
    val = np.asarray(val)
    fit = fit_bias_correction(val, a * val + b)
    assert fit['applied'] and np.isclose(fit['a'], a, atol=1e-7) and np.isclose(fit['b'], b, atol=1e-5)
    assert np.allclose(apply_bias_correction(a * val + b, fit), val, atol=1e-5)


@SETTINGS
@given(counts=subjects, seed=st.integers(0, 2**16))
def test_predict_with_an_identity_correction_reports_the_raw_prediction(counts, seed):
    net = tiny_net(None)
    identity = fit_bias_correction([10.0, 40.0, 70.0], [10.0, 40.0, 70.0])
    imgs, names = decoded(seed, counts)
    df, _, _ = predict_images(run_model(net, bias_correction=identity), names, 3, decoded=(imgs, names), intervals=False)
    assert np.allclose(df['corrected'], df['pred'], atol=1e-9)
