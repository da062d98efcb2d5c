#!/usr/bin/env python
"""Where does the recipe lose to the oracle? `python bench/gap.py` -> bench/gap_results.json and a block of bench/README.md.

bench/ceiling.py measured how much more people buy the recipe. This script reads the same runs (it needs
bench/ceiling.py's finished runs in bench/out/ceiling_runs) and asks where, on the cohort's 200 held-out subjects,
their error exceeds the oracle's, and why.

1. **By age.** The image MAE of each size's models (mean over the 2 seeds) and of the oracle per age band.
2. **Children and the depth setting.** Before 18 the generator's muscle carries age only in its thickness in cm (the
   echo level is flat), and each subject is scanned at a depth of 4, 5 or 6 cm (drawn independently of age), so a
   muscle is 1.5 times as thick in pixels at 4 cm as at 6 cm: more than it grows from 5 to 10 years (1.18 times). The
   scale is in the image mainly as the depth ticks along the bottom edge. If a model cannot read it, a child scanned at
   4 cm looks older than one at 6 cm. The script reports, per size, the children's mean signed error at the shallowest depth minus at the deepest, with a 95%
   interval (the seeds and the children resampled) and a permutation p-value, the first size's contrast minus each
   other's, and the oracle's (which knows the thickness in cm) as a control.
3. **A probe: the scale given.** The recipe trained on the 320-subject split of a copy of the cohort whose images are
   resampled to one scale (pixels per cm) with the depth the generator drew: each image shrinks by its depth over the
   deepest, top-aligned and centred on a black field. This is information the spreadsheet of the real data does not
   hold and the plain loop does not get, so the probe is a yardstick, not a candidate default: it measures how much of
   the gap a model that knew the scale would close. It is scored like the sizes above (seeds 1 and 2), and against the
   recipe on the same split with seeds 1 to 4 (paired; the recipe's seeds 3 and 4 are trained here).
4. **A probe: a finer image.** The same recipe at 128 px instead of 64, on the cohort itself: the ticks then lie 9 to
   14 pixels apart instead of 5 to 7. Does the network read the scale from them when they are sharper? This one needs
   nothing the plain loop lacks, but the plain loop at 128 px would get it too: it bears on the budget, not on
   `mae_over_plain_loop`.

About 30 minutes on a 2-core CPU (two trainings at a time, one thread each). `--render` only renders the block again.
"""
from __future__ import annotations
import argparse, hashlib, json, shutil, sys, time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from agenb import __version__
from agenb.core import file_sha256, git_info
from agenb.stats import boot_means, percentile_interval, resample_counts

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as B       # bench/run.py: paths, data records, CLI runner, machine record
import render         # bench/render.py: fills the marked blocks of bench/README.md
import ceiling as C   # bench/ceiling.py: the cohort, its splits, the recipe and its runs

AGE_BANDS = (0, 10, 18, 40, 60, 75, 90)
POWER_SHIFTS = (3.0, 6.0)       # contrasts (years) at which the depth interval's power is simulated
ADULT = 18                      # before this age the generator's echo level is flat: thickness alone carries age
PROBE_SIZE = 320                # development subjects of the probe (the bench's size)
EXTRA_SEEDS = (3, 4)            # the probes' and the recipe's seeds beyond the ceiling's, for the probe comparison only
PROBE_VERSION = 1               # bump when spacing_image changes what it writes
RESULTS = HERE / 'gap_results.json'


def spacing_image(img: Image.Image, depth_cm: float, ref_cm: float) -> Image.Image:
    """`img` (a scan `depth_cm` deep) at the scale of one `ref_cm` deep: shrunk by depth_cm / ref_cm (bilinear), placed
    at the top and centred on a black field of the same size, so that a centimetre spans as many pixels in every image."""
    if not 0 < depth_cm <= ref_cm: raise ValueError(f'depth {depth_cm} cm must lie in (0, {ref_cm}]')
    W, H = img.size
    w, h = round(W * depth_cm / ref_cm), round(H * depth_cm / ref_cm)
    out = Image.new(img.mode, (W, H), 0)
    out.paste(img.resize((w, h), Image.Resampling.BILINEAR), ((W - w) // 2, 0))
    return out


def ensure_probe_data(src_root, dst_root) -> dict:
    """The cohort's healthy TA images resampled by `spacing_image` to its deepest depth, with its spreadsheet, under
    `dst_root`; reused while its probe.json names the same source data and PROBE_VERSION. Returns that record."""
    src_root, dst_root = Path(src_root), Path(dst_root)
    fp = B.data_record(src_root)['fingerprint']
    want = {'source': B.rel(src_root), 'source_content_sha256': fp['content_sha256'], 'probe_version': PROBE_VERSION}
    meta = dst_root / 'probe.json'
    kept = json.loads(meta.read_text()) if meta.is_file() else {}
    if {k: kept.get(k) for k in want} == want: return kept
    shutil.rmtree(dst_root, ignore_errors=True)
    lat = pd.read_csv(src_root / 'synth_latents.csv').query("muscle == 'TA' and cohort == 'Healthy'")
    ref = float(lat.depth_cm.max())
    src_img, _ = B.data_paths(src_root)
    dst_img, dst_xlsx = B.data_paths(dst_root)
    dst_img.mkdir(parents=True)
    shutil.copy(src_root / 'TA' / 'characteristics.xlsx', dst_xlsx)
    for name, depth in zip(lat.filename, lat.depth_cm):
        with Image.open(src_img / name) as im: spacing_image(im, float(depth), ref).save(dst_img / name)
    digest = hashlib.sha256()
    for p in sorted(dst_img.iterdir()): digest.update(p.name.encode() + file_sha256(p).encode())
    rec = {**want, 'reference_depth_cm': ref, 'n_images': len(lat), 'content_sha256': digest.hexdigest()}
    meta.write_text(json.dumps(rec, indent=1) + '\n')
    return rec


PROBES = {   # record name: (label, its data: the scale-given copy or the cohort itself, the recipe's options it changes)
    'probe': ('scale given', 'spacing', {}),
    'probe128': ('128 px', 'cohort', {'image_size': 128}),
}


def probe_job(name, data_root, data_sha, out_dir, seed, split_file, changed, expected, from_runs=False, timeout=4 * 3600) -> dict:
    """The recipe with the options `changed` (bench/ceiling.py's `train_recipe`) on `data_root` with `split_file`. A
    finished run is kept, not trained again, while its record names the same split, data and changes, its predictions
    are there, its config.json's options are `expected`, and the tree is clean at the same commit (any commit with
    `from_runs`). A run that trained other options than `expected` is an error."""
    record = Path(out_dir) / f'{name}_n{PROBE_SIZE}_s{seed}.json'
    key = {'split_sha256': file_sha256(split_file), 'probe_content_sha256': data_sha, 'changed': dict(changed)}
    fine = lambda run_dir: (Path(run_dir) / 'predictions.csv').is_file() and C.run_record(run_dir)['options'] == expected
    if record.is_file():
        r, now = json.loads(record.read_text()), git_info(B.ROOT)
        if ({k: r.get(k, {}) for k in key} == key and fine(r['run_dir'])
                and (from_runs or (r['commit'] == now['commit'] and not now['dirty']))):
            print(f'gap: {name} seed={seed}: kept from {B.rel(record)}', flush=True)
            return {**r, 'run_dir': Path(r['run_dir'])}
    run_dir, wall = C.train_recipe(data_root, out_dir, f'{name}_n{PROBE_SIZE}_s{seed}', seed, split_file, changed, timeout)
    if not fine(run_dir): B.refuse(f'gap: {B.rel(run_dir)} trained other options than the recipe with {changed}, or wrote no predictions')
    r = {'n': PROBE_SIZE, 'seed': seed, 'run_dir': str(run_dir), 'wall_seconds': round(wall, 1), **key, 'commit': git_info(B.ROOT)['commit']}
    record.write_text(json.dumps(r))
    print(f'gap: {name} seed={seed} done in {render._minutes(wall)}', flush=True)
    return {**r, 'run_dir': Path(run_dir)}


def held_out_images(cohort_root, split_file) -> pd.DataFrame:
    "bench/ceiling.py's scored images of the held-out subjects of `split_file`, with each image's depth setting in cm."
    held = pd.read_csv(split_file, dtype={'subject': str}).query("split == 'test'").subject
    j = C.scored_images(cohort_root, held)
    lat = pd.read_csv(Path(cohort_root) / 'synth_latents.csv').query("muscle == 'TA' and cohort == 'Healthy'")
    return j.assign(depth_cm=j.filename.map(lat.set_index('filename').depth_cm))


def band_of(age) -> np.ndarray:
    "Index of each age's band in AGE_BANDS (the last band includes its upper edge)."
    return np.digitize(np.asarray(age, float), AGE_BANDS[1:-1])


def by_age(j, preds) -> list:
    """Per age band: images, subjects, the oracle's image MAE and each predictor's (`preds`: name -> list of one
    prediction array per seed; its MAE is the mean over the seeds)."""
    band, err = band_of(j.age), lambda p: np.abs(np.asarray(p, float) - j.age.to_numpy())
    rows = []
    for b in range(len(AGE_BANDS) - 1):
        m = band == b
        mae = lambda ps: round(float(np.mean([err(p)[m].mean() for p in ps])), 2) if m.any() else None   # None: nobody
        row = {'band': f'{AGE_BANDS[b]}-{AGE_BANDS[b + 1]}', 'n_images': int(m.sum()),
               'n_subjects': int(j.subject[m].nunique()), 'oracle': mae([j.oracle])}
        row.update({name: mae(ps) for name, ps in preds.items()})
        rows.append(row)
    return rows


def _at_depths(E, weights, n_img, depth, lo, hi):
    """Mean signed error at depth `lo` and at `hi` for each row of weights (k, subjects); E: (k, subjects) error sums.
    A row that weighs no child at one of the depths gives nan."""
    with np.errstate(invalid='ignore', divide='ignore'):
        g = lambda d: (E * weights * (depth == d)).sum(1) / (n_img * weights * (depth == d)).sum(1)
        return g(lo), g(hi)


def _contrasts(E, w, n_img, depth, lo, hi, rng) -> np.ndarray:
    "The lo-minus-hi contrast per row of subject weights `w`, the seeds (rows of E) resampled on their own."
    sw = resample_counts(len(E), len(w), rng) / len(E) if len(E) > 1 else np.ones((len(w), 1))
    a, b = _at_depths(sw @ E, w, n_img, depth, lo, hi)
    return a - b


def depth_contrast(j, preds, n_boot=2000, boot_seed=0, n_perm=2000, n_sim=1000) -> dict:
    """Children (age < ADULT): each predictor's mean signed error (years) at the shallowest depth setting minus at the
    deepest, with a 95% interval (the children resampled by subject, once for all predictors: paired; each predictor's
    seeds resampled on their own; a resample that drew no child at one of the two depths is left out), a permutation
    p-value (the depth settings shuffled among the children), and the first model's contrast minus this one's with its
    interval (paired). The oracle (which knows the thickness in cm) is the control. `interval_false_alarm`: how often
    the interval of the first model leaves out 0 when its depth settings are shuffled (`n_sim` shuffles), i.e. where
    nothing differs; `interval_power`: how often it leaves out 0 when a known contrast of POWER_SHIFTS years is then
    added to the shuffled children's errors."""
    c = j[j.age < ADULT]
    ids, inv = np.unique(c.subject.astype(str).to_numpy(), return_inverse=True)
    per_subject = pd.Series(c.depth_cm.to_numpy()).groupby(inv)
    if (per_subject.nunique() > 1).any(): raise ValueError('a child has images at more than one depth setting')
    depth = per_subject.first().to_numpy()
    lo, hi = depth.min(), depth.max()
    n_img = np.bincount(inv, minlength=len(ids)).astype(float)
    rng = np.random.default_rng(boot_seed)
    w = resample_counts(len(ids), n_boot, rng).astype(float)
    perms = np.stack([rng.permutation(depth) for _ in range(n_perm)])
    ones = np.ones((1, len(ids)))
    sums = {name: np.stack([np.bincount(inv, np.asarray(p, float)[(j.age < ADULT).to_numpy()] - c.age.to_numpy(),
                                        minlength=len(ids)) for p in ps]) for name, ps in {'oracle': [j.oracle], **preds}.items()}
    first = next(iter(preds))
    reps = {name: _contrasts(E, w, n_img, depth, lo, hi, rng) for name, E in sums.items()}
    out = {'shallow_cm': float(lo), 'deep_cm': float(hi), 'n_children': len(ids),
           'n_subjects': {str(lo): int((depth == lo).sum()), str(hi): int((depth == hi).sum())}, 'first': first, 'predictors': {}}
    ci = lambda x: [round(v, 2) for v in percentile_interval(x[np.isfinite(x)])]
    used = int(np.isfinite(reps[first]).sum())
    point = {}
    for name, E in sums.items():
        a, b = _at_depths(E.mean(0)[None], ones, n_img, depth, lo, hi)
        point[name] = float(a[0] - b[0])
        pa, pb = _at_depths(E.mean(0)[None], ones, n_img, perms, lo, hi)   # one row per shuffle
        out['predictors'][name] = {'shallow': round(float(a[0]), 2), 'deep': round(float(b[0]), 2),
                                   'difference': round(point[name], 2), 'difference_ci95': ci(reps[name]),
                                   'permutation_p': round(float((1 + (np.abs(pa - pb) >= abs(point[name]) - 1e-12).sum()) / (1 + n_perm)), 4)}
    for name in sums:
        if name not in ('oracle', first):
            out['predictors'][name].update(first_minus_this=round(point[first] - point[name], 2),
                                           first_minus_this_ci95=ci(reps[first] - reps[name]))
    hits = {s: [] for s in (0.0, *POWER_SHIFTS)}
    for _ in range(n_sim):
        d = rng.permutation(depth)
        for s in hits:   # s years added to every image of the children now at the shallow depth
            x = _contrasts(sums[first] + s * n_img * (d == lo), w[:1000], n_img, d, lo, hi, rng)
            lo_, hi_ = percentile_interval(x[np.isfinite(x)])
            hits[s].append(not lo_ <= 0 <= hi_)
    sim = {'predictor': first, 'n_shuffles': n_sim, 'n_boot': min(1000, n_boot)}
    out['interval_false_alarm'] = {**sim, 'rate': round(float(np.mean(hits[0.0])), 3)}
    out['interval_power'] = {**sim, 'rate_by_shift': {f'{s:g}': round(float(np.mean(hits[s])), 3) for s in POWER_SHIFTS}}
    out['n_boot_used'] = used
    out['method'] = (f'{n_boot} bootstrap resamples of the {len(ids)} held-out children (seed {boot_seed}), shared by all predictors; '
                     f'each predictor\'s training seeds resampled on their own; the {n_boot - used} resamples that drew no child at '
                     f'{lo:g} cm or none at {hi:g} cm left out; percentile interval. Permutation p: {n_perm} shuffles of the '
                     'depth settings among the children, two-sided')
    return out


def probe_comparison(j, probe, recipe, n_boot=2000, boot_seed=0) -> dict:
    """The probe against the recipe on the same split and seeds, and against the oracle, on the images `j`:
    image MAE per seed, the ratio of the seed means with 95% intervals (agenb.stats.boot_means: paired subjects)."""
    cubes = {'probe': np.stack([B.subject_error_sums(j, p) for p in probe]),
             'recipe': np.stack([B.subject_error_sums(j, p) for p in recipe]), 'oracle': B.subject_error_sums(j, j.oracle)[None]}
    M = dict(zip(cubes, boot_means(cubes, n_boot, boot_seed)))
    pt = {k: c.mean(0).sum() for k, c in cubes.items()}
    mae = lambda p: round(float(np.mean(np.abs(np.asarray(p, float) - j.age))), 3)
    ratio = lambda a, b: {'point': round(float(pt[a] / pt[b]), 3), 'ci95': [round(x, 3) for x in percentile_interval(M[a] / M[b])]}
    return {'probe_test_mae_per_seed': [mae(p) for p in probe], 'recipe_test_mae_per_seed': [mae(p) for p in recipe],
            'probe_over_recipe': ratio('probe', 'recipe'), 'probe_over_oracle': ratio('probe', 'oracle'),
            'method': f'{n_boot} bootstrap resamples: each side\'s seeds drawn with replacement on their own, the '
                      f'{j.subject.nunique()} held-out subjects drawn once for all (seed {boot_seed}); percentile interval'}


def gap_block(res) -> str:
    "bench/README.md's block of where the gap lies, rendered from gap_results.json."
    P = res['probes']
    names = [str(n) for n in res['sizes']] + [p['column'] for p in P.values()]
    cell = lambda x: '-' if x is None else f'{x:.2f}'
    label = lambda n: f'{n} (probe)' if n in [p['column'] for p in P.values()] else f'{n} subjects'
    lines = ['Image MAE (years) on the cohort\'s held-out subjects per age band; a size\'s models are averaged over their seeds.', '',
             '| age | images (subjects) | oracle | ' + ' | '.join(label(n) for n in names) + ' |',
             '|---|---:|---:|' + '---:|' * len(names)]
    lines += [f'| {r["band"]} | {r["n_images"]} ({r["n_subjects"]}) | {cell(r["oracle"])} | ' + ' | '.join(cell(r[n]) for n in names) + ' |'
              for r in res['by_age']]
    d = res['children_by_depth']
    s, t = d['shallow_cm'], d['deep_cm']
    fa = d['interval_false_alarm']
    lines += ['', f'Children (under {ADULT}): mean signed error (years; positive: predicted too old) of the {d["n_subjects"][str(s)]} '
              f'held-out children scanned at {s:g} cm and the {d["n_subjects"][str(t)]} at {t:g} cm. {d["method"]}. Where nothing '
              f'differs (the {label(fa["predictor"])}\' depth settings shuffled, {fa["n_shuffles"]} times) the interval leaves out 0 '
              f'in {100 * fa["rate"]:.1f}% of the shuffles; with a contrast of '
              + ' and '.join(f'{s} years added it does in {100 * r:.1f}%' for s, r in d['interval_power']['rate_by_shift'].items())
              + ' (power).', '',
              f'| predictor | at {s:g} cm | at {t:g} cm | {s:g} cm minus {t:g} cm [95% CI] | permutation p | '
              f'{label(d["first"])}\' contrast minus this one [95% CI] |', '|---|---:|---:|---|---:|---|']
    pm = lambda x, c: f'{x:+.2f} [{c[0]:+.2f}, {c[1]:+.2f}]'
    for n, r in d['predictors'].items():
        vs = pm(r['first_minus_this'], r['first_minus_this_ci95']) if 'first_minus_this' in r else ''
        lines.append(f'| {"oracle (knows the thickness in cm)" if n == "oracle" else label(n)} | {r["shallow"]:+.2f} | {r["deep"]:+.2f} | '
                     f'{pm(r["difference"], r["difference_ci95"])} | {r["permutation_p"]:.3f} | {vs} |')
    ci = lambda r: f'{r["point"]:.3f} [{r["ci95"][0]:.3f}, {r["ci95"][1]:.3f}]'
    seeds = lambda xs: ', '.join(f'{x:.2f}' for x in xs)
    q0 = next(iter(P.values()))['comparison']
    extra = res['recipe_extra_seeds']['runs']
    lines += ['', f'The probes: the recipe with one change on the {PROBE_SIZE}-subject split, seeds {", ".join(map(str, q0["seeds"]))}, '
              f'against the recipe on the same split and seeds (its seeds {", ".join(str(r["seed"]) for r in extra)} trained here, '
              f'{render._minutes(sum(r["wall_seconds"] for r in extra))} in all; the tables above hold seeds '
              f'{", ".join(map(str, res["seeds"]))} only, as for every size). {q0["method"]}.', '',
              '| probe | what changes | test MAE per seed (the recipe\'s) | over the recipe [95% CI] | over the oracle [95% CI] (the '
              'recipe\'s: the data curve above) | trainings |',
              '|---|---|---|---|---|---|']
    for p in P.values():
        q = p['comparison']
        what = (f'images resampled to one scale ({p["data"]["reference_depth_cm"]:g} cm deep; version {p["data"]["probe_version"]})'
                if p['data'].get('probe_version') else ', '.join(f'`{k}` {v}' for k, v in p['changed'].items()))
        lines.append(f'| {p["column"]} | {what} | {seeds(q["probe_test_mae_per_seed"])} ({seeds(q["recipe_test_mae_per_seed"])}) | '
                     f'{ci(q["probe_over_recipe"])} | {ci(q["probe_over_oracle"])} | '
                     f'{len(p["runs"])}, {render._minutes(sum(r["wall_seconds"] for r in p["runs"]))} in all |')
    a = res['agenb']
    gits = [a] if a.get('commit') else [json.loads(g) for g in a['runs_trained_by']]
    trained = ('commit ' if len(gits) == 1 else 'commits ') + ', '.join(
        f'`{g["commit"][:10]}`' + (' with uncommitted changes' if g['dirty'] else ' with a clean tree') for g in gits)
    lines += ['', f'The probes and the recipe\'s extra seeds were trained by {trained}; two at a time, one thread each.']
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--workers', type=int, default=2, help='probe trainings at a time, one thread each (default: %(default)s)')
    p.add_argument('--from-runs', action='store_true', help='keep finished probe runs whatever commit trained them (and train '
                   'those not run yet)')
    p.add_argument('--render', action='store_true', help='only render bench/README.md\'s block again from bench/gap_results.json')
    a = p.parse_args(argv)
    if a.render:
        render.update_readme(render.README, None, 'gap', gap_block(json.loads(RESULTS.read_text())))
        return print(f'rendered from {B.rel(RESULTS)}')
    t0 = time.time()
    agenb = {'version': __version__, **git_info(B.ROOT)}   # read before anything is written
    ceil = json.loads(C.RESULTS.read_text())
    cohort_root, out_dir = B.OUT / 'data_ceiling', B.OUT / 'ceiling_runs'
    runs = [{**r, 'run_dir': B.ROOT / r['run_dir']} for r in ceil['runs']]
    if missing := [B.rel(r['run_dir']) for r in runs if not (r['run_dir'] / 'predictions.csv').is_file()]:
        B.refuse(f'gap: {len(missing)} runs of {B.rel(C.RESULTS)} are missing (e.g. {missing[0]}): run python bench/ceiling.py '
                 'first (about 45 minutes)')
    splits = C.split_files(cohort_root, out_dir, ceil['sizes'])
    if changed := sorted({r['n'] for r in runs if r['split_sha256'] != file_sha256(splits[r['n']])}):
        B.refuse(f'gap: the split of {", ".join(map(str, changed))} subjects is no longer the one the ceiling runs were trained '
                 'on: run python bench/ceiling.py again first')
    j = held_out_images(cohort_root, splits[ceil['sizes'][0]])

    def pred(run_dir):
        p = j.filename.map(pd.read_csv(Path(run_dir) / 'predictions.csv').set_index('filename').pred).to_numpy()
        if not np.isfinite(p).all(): B.refuse(f'gap: {B.rel(run_dir)} did not predict every held-out image: train it again')
        return p
    preds = {str(n): [pred(r['run_dir']) for r in runs if r['n'] == n] for n in ceil['sizes']}
    cohort = B.data_record(cohort_root)
    data = {'spacing': (B.OUT / 'data_ceiling_spacing', ensure_probe_data(cohort_root, B.OUT / 'data_ceiling_spacing')),
            'cohort': (cohort_root, {'source': B.rel(cohort_root), 'content_sha256': cohort['fingerprint']['content_sha256']})}
    seeds = list(ceil['seeds']) + list(EXTRA_SEEDS)
    specs = {**PROBES, 'recipe': ('the recipe', 'cohort', {})}   # 'recipe': the ceiling's 320 runs' extra seeds
    jobs = [(name, s) for name in PROBES for s in seeds] + [('recipe', s) for s in EXTRA_SEEDS]
    recipe = C.run_record(next(x['run_dir'] for x in runs if x['n'] == PROBE_SIZE))['options']
    job = lambda ns: probe_job(ns[0], data[specs[ns[0]][1]][0], data[specs[ns[0]][1]][1]['content_sha256'], out_dir, ns[1],
                               splits[PROBE_SIZE], specs[ns[0]][2], {**recipe, **specs[ns[0]][2]}, a.from_runs)
    with ThreadPoolExecutor(a.workers) as ex: done = dict(zip(jobs, ex.map(job, jobs)))
    for r in done.values(): r.update(C.run_record(r['run_dir']))
    record = lambda rs: [{k: (B.rel(v) if isinstance(v, Path) else v) for k, v in r.items() if k not in ('commit', 'options', 'changed')}
                         for r in rs]
    recipe_all = preds[str(PROBE_SIZE)] + [pred(done['recipe', s]['run_dir']) for s in EXTRA_SEEDS]
    probes = {}
    for name, (label, data_name, changed) in PROBES.items():
        mine = [done[name, s] for s in seeds]
        column = f'{PROBE_SIZE} subjects, {label}'
        every = [pred(r['run_dir']) for r in mine]
        preds[column] = every[:len(ceil['seeds'])]               # the tables: the ceiling's seeds, as every size
        probes[name] = {'column': column, 'size': PROBE_SIZE, 'changed': changed, 'data': data[data_name][1], 'options': mine[0]['options'],
                        'comparison': {'seeds': seeds, **probe_comparison(j, every, recipe_all)}, 'runs': record(mine)}
    trained_by = sorted({json.dumps(r['git'], sort_keys=True) for r in done.values()})
    res = {'what': 'issue 27: where the recipe\'s error exceeds the oracle\'s on bench/ceiling.py\'s held-out subjects, and '
                   'probes of why', 'ceiling_results': B.rel(C.RESULTS), 'ceiling_commit': ceil['agenb']['commit'],
           'sizes': ceil['sizes'], 'seeds': ceil['seeds'], 'n_images': len(j), 'n_subjects': int(j.subject.nunique()),
           'age_bands': list(AGE_BANDS), 'by_age': by_age(j, preds), 'children_by_depth': depth_contrast(j, preds),
           'probes': probes, 'recipe_extra_seeds': {'options': done['recipe', EXTRA_SEEDS[0]]['options'],
                                                     'runs': record([done['recipe', s] for s in EXTRA_SEEDS])},
           'cohort': cohort, 'machine': B.machine_info(),
           'agenb': {'version': agenb['version'], **json.loads(trained_by[0])} if len(trained_by) == 1 else
                    {'version': agenb['version'], 'commit': None, 'dirty': None, 'runs_trained_by': trained_by},
           'results_written_by': agenb, 'command': ' '.join(['bench/gap.py', *(argv if argv is not None else sys.argv[1:])]),
           'created_at': datetime.now().isoformat(timespec='seconds'), 'wall_seconds': round(time.time() - t0, 1)}
    RESULTS.write_text(json.dumps(res, indent=1) + '\n')
    print(gap_block(res))
    render.update_readme(render.README, res, 'gap', gap_block(res))
    print(f'wrote {B.rel(RESULTS)}')


if __name__ == '__main__':
    main()
