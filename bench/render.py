#!/usr/bin/env python
"""Render the benchmark's figures from bench/results.json into markdown, so that no figure is typed by hand.

    python bench/render.py                       # rewrite the <!-- results:begin/end --> block of bench/README.md
    python bench/render.py --readme nbs/index.ipynb   # also fill a <!-- bench:begin/end --> block there (a markdown
                                                      # cell of a notebook, or any text file) with the summary
    python bench/render.py --summary             # print the summary (the project README's few lines)

bench/run.py calls `update_readme` after writing bench/results.json.
"""
from __future__ import annotations
import argparse, json, re, sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS, README = HERE / 'results.json', HERE / 'README.md'
# the accuracy section alone, run again when the data or the defaults change without a whole `make bench`:
# python bench/run.py --only accuracy --no-combined --out bench/accuracy_results.json (then bench/render.py)
ACCURACY = HERE / 'accuracy_results.json'
# the fold ensemble beside single models alone: python bench/run.py --only ensemble --out bench/ensemble_results.json
ENSEMBLE = HERE / 'ensemble_results.json'

def _g(d, *keys):
    "d[k1][k2]...: a dict's key or a list's index at each step, or None where one is missing."
    for k in keys:
        if isinstance(d, dict): d = d.get(k)
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d): d = d[k]
        else: return None
    return d

def _n(x, digits=3):
    "A number with `digits` significant digits (thousands separated), or '-'."
    if x is None: return '-'
    x = float(x)
    if abs(x) >= 10 ** digits: return f'{x:,.0f}'
    s = f'{x:#.{digits}g}'                                   # '#': keep trailing zeros (1.00, not 1)
    return (s if 'e' not in s else f'{x:.0f}').rstrip('.')

def _r(s, unit='', digits=3):
    "`median unit (min .. max)` of a summary dict."
    if not s: return '-'
    return f"{_n(s['median'], digits)}{unit} ({_n(s['min'], digits)} .. {_n(s['max'], digits)})"

def _ci(A, key):
    "`ratio [low, high]`: the ratio and its 95% interval over test subjects."
    ci = _g(A, 'ratio_ci95', key)
    return _n(A.get(key)) + (f' [{_n(ci[0])}, {_n(ci[1])}]' if ci else '')

def _seed_ci(S, key):
    "`ratio [low, high]` of a seed-averaged ratio (the accuracy section's `seeds`), its interval over seeds and subjects."
    lo, hi = S.get(key + '_ci95') or [None, None]
    return f"{_n(S.get(key))} [{_n(lo)}, {_n(hi)}]"

def _plain_met(upper) -> str:
    "Issue 27's target for `mae_over_plain_loop`: the upper end of its 95% interval below 1.0."
    return 'met' if upper is not None and upper < 1.0 else '**not met**'

def _met(value, target, higher=True):
    if value is None: return ''
    ok = value >= target if higher else value <= target
    return 'met' if ok else '**not met**'

def _over_oracle(x) -> str:
    "A model's `mae_over_oracle` with its 95% interval (bench/run.py's `ensemble` section)."
    lo, hi = x['mae_over_oracle_ci95']
    return f"{_n(x['mae_over_oracle'])} [{_n(lo)}, {_n(hi)}]"

def _loadavg_range(res):
    vals = [v[0] for v in (_g(res, 'machine', 'loadavg_at_start'), _g(res, 'machine', 'loadavg_at_end')) if v]
    for s in (res.get('section_loadavg') or {}).values():
        vals += [v[0] for v in (s.get('start'), s.get('end')) if v]
    return (min(vals), max(vals)) if vals else None

def _minutes(s):
    if s is None: return '-'
    m, sec = divmod(int(round(s)), 60)
    return f'{m} min {sec} s' if m else f'{sec} s'

def provenance(res) -> str:
    "One paragraph: which code, which data, which machine, how loaded."
    m, ag, d = res.get('machine') or {}, res.get('agenb') or {}, res.get('data') or {}
    fp = d.get('fingerprint') or {}
    p = fp.get('params') or {}
    commit = (ag.get('commit') or '?')[:10]
    tree = {True: 'with uncommitted changes', False: 'clean tree'}.get(ag.get('dirty'), 'tree state unknown')
    la = _loadavg_range(res)
    cores = m.get('usable_cores') or m.get('cores')
    size = 'x'.join(str(v) for v in p.get('size') or []) or '?'
    load = f'; load average (1 min) {la[0]:.1f} .. {la[1]:.1f} during the run' if la else ''
    return (f"agenb {ag.get('version', '?')} at commit `{commit}` ({tree}); data `{d.get('dir')}`: agenb.synth version "
            f"{fp.get('version')}, preset {fp.get('preset')}, seed {fp.get('seed')}, {p.get('subjects')} healthy + "
            f"{p.get('pathological')} pathological subjects, {size} px, covariate effects "
            f"{'on' if p.get('covariate_effect') else 'off'}, files sha256 `{(fp.get('content_sha256') or '?')[:12]}` "
            f"({fp.get('n_files')} files{'' if fp.get('files_match', True) else ', NOT those its synth_meta.json records'}); "
            f"{cores}-core {m.get('cpu_model')}, {m.get('ram_gib')} GiB, torch {m.get('torch')}, "
            f"{(m.get('date') or '')[:16].replace('T', ' ')}{load}; `{res.get('command', 'bench/run.py')}` took "
            f"{_minutes(res.get('total_seconds'))}.")

def table(res) -> str:
    "The bench/README.md table of the last run."
    L, E, D, A = (res.get(k) or {} for k in ('loader', 'efficiency', 'ddp', 'accuracy'))
    rows = []
    if L:
        st = L.get('agenb_batch_stage_ms_per_image') or {}
        rows += [
            ("users' loader, images/s", _r(L.get('users_images_per_s')), ''),
            ('agenb, warm cache, first epoch / later epochs, images/s (with augmentation)',
             f"{_n(_g(L, 'agenb_warm_first_epoch_images_per_s', 'median'))} / {_n(_g(L, 'agenb_later_epochs_images_per_s', 'median'))}", ''),
            ('**`loader_speedup`**: later epochs, same work on both sides (no augmentation)',
             _r(L.get('speedup_later_epochs_no_augmentation'), 'x'), f">= 10x: {_met(res.get('loader_speedup'), 10)}"),
            ('loader speedup, first epoch from the warm disk cache, no augmentation',
             _r(L.get('speedup_warm_first_epoch_no_augmentation'), 'x'), ''),
            ("loader speedup with agenb's augmentation (which the users' loader never did), first / later epochs",
             f"{_n(_g(L, 'speedup_warm_first_epoch', 'median'))}x / {_n(_g(L, 'speedup_later_epochs', 'median'))}x", ''),
            ('loader speedup, cold cache (first decode)', _r(L.get('speedup_cold_first_epoch'), 'x'), ''),
            ('agenb per-batch stages at 224 px, ms/image: index+float / augment / normalise',
             ' / '.join(_n(_g(st, k, 'median'), 2) for k in ('index_float', 'augment', 'normalize')), ''),
        ]
    if E:
        rows += [
            (f"`pipeline_efficiency` ({_g(E, 'settings', 'arch')}, {_g(E, 'settings', 'image_size')} px)",
             _r(E.get('pipeline_efficiency')), f">= 0.9: {_met(res.get('pipeline_efficiency'), 0.9)}"),
            ('`trainer_overhead`', _r(E.get('trainer_overhead')), f"<= 1.05: {_met(res.get('trainer_overhead'), 1.05, False)}"),
        ]
    if D:
        rows.append(('`ddp_speedup` (2 processes x 1 thread vs 1 x 2 threads)', _r(D.get('ddp_speedup'), 'x'), ''))
    if A:
        s = A.get('settings') or {}
        P = A.get('plain_loop') or {}
        S = A.get('seeds') or {}
        if S:   # several training seeds: their means, the intervals resampling seeds and test subjects (issue 27's targets)
            rows += [
                (f"test MAE, years, mean of {len(S['per_seed'])} training seeds: agenb ({s.get('arch')}, {s.get('image_size')} "
                 f"px, {s.get('epochs')} epochs) / plain PyTorch loop / oracle on the test images / baseline",
                 f"{_n(S.get('test_mae_mean'))} / {_n(S.get('plain_test_mae_mean'))} / {_n(A.get('oracle_mae_test_images'))} / "
                 f"{_n(A.get('baseline_mae'))}", ''),
                ('`mae_over_oracle` [95% interval over seeds and test subjects]', f"**{_seed_ci(S, 'mae_over_oracle')}**",
                 f"<= 1.20: {_met(S.get('mae_over_oracle'), 1.20, False)}"),
                ('`mae_over_plain_loop` [95% interval over seeds and test subjects]', f"**{_seed_ci(S, 'mae_over_plain_loop')}**",
                 f"upper end below 1: {_plain_met(_g(S, 'mae_over_plain_loop_ci95', 1))}"),
            ]
        else:
            rows += [
                (f"test MAE, years: agenb ({s.get('arch')}, {s.get('image_size')} px, {s.get('epochs')} epochs) / "
                 "plain PyTorch loop / oracle on the test images / baseline",
                 f"{_n(A.get('test_mae'))} / {_n(P.get('test_mae'))} / {_n(A.get('oracle_mae_test_images'))} / {_n(A.get('baseline_mae'))}", ''),
                ('`mae_over_oracle` [95% interval over test subjects]', f"**{_ci(A, 'mae_over_oracle')}**",
                 f"<= 1.3: {_met(A.get('mae_over_oracle'), 1.3, False)}"),
                ('`mae_over_plain_loop` [95% interval over test subjects]', f"**{_ci(A, 'mae_over_plain_loop')}**",
                 'below 1: agenb better'),
            ]
        rows += [
            ('`mae_over_baseline`' + (' (first seed)' if A.get('seeds') else ''), _n(A.get('mae_over_baseline')), 'well below 1'),
            ('oracle knowing sex and BMI, test images (the floor for fusion with covariates)',
             _n(A.get('oracle_mae_with_covariates_test_images')), ''),
        ]
        C = A.get('combined') or {}
        if C.get('subject_mae') is not None:
            rows += [
                (f"best combination of the models table ({' + '.join(C.get('of') or [])}, chosen on validation; same settings "
                 "and split): test MAE / subject-level MAE / MAE of subjects 45-64 / slope",
                 f"{_n(C.get('test_mae'))} / {_n(C.get('subject_mae'))} / {_n(C.get('mae_45_64'))} / {_n(C.get('slope'))}", ''),
                ("best combination's subject-level MAE over the oracle averaged over each subject's test images",
                 f"**{_n(C.get('subject_mae_over_oracle'))}** (oracle {_n(C.get('oracle_subject_mae'))})",
                 f"<= 1.10: {_met(C.get('subject_mae_over_oracle'), 1.10, False)}"),
            ]
        elif C.get('skipped'):
            rows.append(('best combination of the models table', 'not run', C['skipped']))
    En = res.get('ensemble') or {}
    if En.get('fold_ensemble'):
        rows.append((f"test MAE over the oracle: fold ensemble ({En['fold_ensemble']['n_models']} models) / single models "
                     f"(`{En['spec']}` `{En['variant']}`, {En['options'].get('image_size')} px, {En['options'].get('epochs')} "
                     'epochs) [95% intervals]', f"**{_over_oracle(En['fold_ensemble'])}** / {_over_oracle(En['single'])}", ''))
    out = ['| figure | median (min .. max) | target |', '|---|---|---|']
    out += [f'| {a} | {b} | {c} |' for a, b, c in rows]
    return '\n'.join(out)

def limits(res) -> str:
    "The figures behind 'what limits these', from this run."
    L, E, A = (res.get(k) or {} for k in ('loader', 'efficiency', 'accuracy'))
    out = []
    st = L.get('agenb_batch_stage_ms_per_image') or {}
    if st:
        aug = _g(st, 'augment', 'median'); tot = sum(_g(st, k, 'median') or 0 for k in st)
        out.append(f"* Loader: of agenb's {_n(tot, 2)} ms per 224 px image in later epochs, the augmentation "
                   f"(rotation by `grid_sample` on the CPU) takes {_n(aug, 2)}; the users' pipeline augments nothing.")
    if E:
        out.append(f"* Training pass: agenb's epoch keeps {_n(_g(E, 'pipeline_efficiency', 'median'))} of the bare model "
                   f"step's speed at {_g(E, 'settings', 'image_size')} px, with the data work included.")
    if A:
        P = A.get('plain_loop') or {}
        first = f"the first training seed's ({A['seeds']['per_seed'][0]['seed']}) " if A.get('seeds') else ''
        out.append(f"* Accuracy, {first}run{': ' if first else ''}agenb's best validation epoch was {A.get('best_epoch')} of {A.get('epochs_completed')} "
                   f"(validation MAE {_n(A.get('best_val_mae'))}); the plain loop's was {P.get('best_epoch')} "
                   f"(validation MAE {_n(P.get('best_val_mae'))}). Subject-level test MAE {_n(A.get('subject_level_mae'))}, "
                   f"RMSE {_n(A.get('test_rmse'))}, r {_n(A.get('test_pearson_r'))}; "
                   f"{A.get('n_test_images')} test images of {A.get('n_test_subjects')} subjects. The accuracy section "
                   f"took {_minutes(_g(res, 'section_seconds', 'accuracy'))}.")
    return '\n'.join(out)

def bench_block(res) -> str:
    "The whole generated block of bench/README.md."
    return '\n\n'.join([
        '## Last run (rendered from `results.json` by `bench/render.py`: edit neither by hand)',
        provenance(res), table(res), '**Figures behind the notes below**, from the same run:', limits(res)])

def summary(res) -> str:
    """A few lines for the project README. With several training seeds (`accuracy.seeds`) the test MAEs are their means
    and the ratios' intervals resample seeds and test subjects; with an `ensemble` section, its fold ensemble's ratio
    to the oracle stands beside the single model's. Each ratio says whether issue 27's target is met."""
    A = res.get('accuracy') or {}
    P = A.get('plain_loop') or {}
    S = A.get('seeds') or {}
    s = A.get('settings') or {}
    ag = res.get('agenb') or {}
    fp = _g(res, 'data', 'fingerprint') or {}
    m = res.get('machine') or {}
    rows = [
        ('loader: images/s once decoded, agenb vs a plain PIL `DataLoader`', f"{_n(res.get('loader_speedup'))}x"),
        ('training pass: agenb epoch vs the bare model step / vs a hand-written loop',
         f"{_n(res.get('pipeline_efficiency'))} / {_n(res.get('trainer_overhead'))}"),
    ]
    what = f"({s.get('arch')} from scratch, {s.get('image_size')} px, {s.get('epochs')} epochs"
    if S:
        rows += [(f"test MAE on the bench data {what}, mean of {len(S['per_seed'])} training seeds): agenb / a plain "
                  'PyTorch loop / the oracle', f"{_n(S['test_mae_mean'])} / {_n(S.get('plain_test_mae_mean'))} / "
                  f"{_n(A.get('oracle_mae_test_images'))} years"),
                 ('`mae_over_plain_loop` [95% interval over seeds and test subjects]; target: upper end below 1.0',
                  f"{_seed_ci(S, 'mae_over_plain_loop')}: {_plain_met(_g(S, 'mae_over_plain_loop_ci95', 1))}"),
                 ('`mae_over_oracle`, one model [95% interval over seeds and test subjects]; target: at most 1.20',
                  f"{_seed_ci(S, 'mae_over_oracle')}: {_met(S.get('mae_over_oracle'), 1.20, higher=False)}")]
    else:
        rows += [(f"test MAE on the bench data {what}): agenb / a plain PyTorch loop / the oracle",
                  f"{_n(A.get('test_mae'))} / {_n(P.get('test_mae'))} / {_n(A.get('oracle_mae_test_images'))} years"),
                 ('`mae_over_plain_loop` / `mae_over_oracle` [95% intervals over test subjects]',
                  f"{_ci(A, 'mae_over_plain_loop')} / {_ci(A, 'mae_over_oracle')}")]
    E = res.get('ensemble') or {}
    if E.get('fold_ensemble'):
        F, one = E['fold_ensemble'], E['single']
        rows.append((f"over the oracle at {_g(E, 'options', 'image_size')} px, {_g(E, 'options', 'epochs')} epochs: "
                     f"one model trained on all development subjects / the fold ensemble ({F['n_models']} models, what "
                     '`experiment predict` uses) [95% intervals]; target: at most 1.20',
                     f"{_over_oracle(one)}: {_met(one['mae_over_oracle'], 1.20, higher=False)} / {_over_oracle(F)}: "
                     f"{_met(F['mae_over_oracle'], 1.20, higher=False)}"))
    C = A.get('combined') or {}
    if C.get('subject_mae') is not None:
        rows.append((f"best combination of the models table ({' + '.join(C.get('of') or [])}, same settings and split): "
                     "subject-level MAE / the oracle on its test images", f"{_n(C.get('subject_mae'))} / {_n(C.get('oracle_subject_mae'))} "
                     f"years ({_n(C.get('subject_mae_over_oracle'))}x; plain: {_n(A.get('subject_level_mae'))})"))
    return '\n'.join([
        f"| `make bench` ({m.get('usable_cores') or m.get('cores')}-core CPU; `bench/results.json`) | result |", '|---|---|',
        *[f'| {a} | {b} |' for a, b in rows], '',
        f"Measured at commit `{(ag.get('commit') or '?')[:10]}` on data of agenb.synth version {fp.get('version')} "
        f"(preset {fp.get('preset')}); the figures above are rendered from `bench/results.json` by `bench/render.py`."
        + stale_note(fp)])

def accuracy_block(acc, source=ACCURACY.name) -> str:
    """The accuracy section (of `make bench`'s results, or run alone: `source` names the file): agenb, the plain loop and
    the oracle on one split,
    with the two ratios' intervals and the targets of issue 27, and where the figures come from. With several training
    seeds (`seeds`) the figures are means over the seeds and the intervals resample seeds and test subjects."""
    A, P = acc['accuracy'], acc['accuracy'].get('plain_loop') or {}
    s, ag, fp, m = A['settings'], acc.get('agenb') or {}, _g(acc, 'data', 'fingerprint') or {}, acc.get('machine') or {}
    S = A.get('seeds')
    dirty = ag.get('dirty_files') or []
    tree = ('a clean tree' if not ag.get('dirty') else
            f"a tree with uncommitted changes in {', '.join(f'`{f}`' for f in dirty)}" if dirty else 'a tree with uncommitted changes')
    opts = ', '.join(f'{k} {s[k]:g}' for k in ('lr', 'warmup_epochs', 'rotation', 'brightness', 'contrast', 'dropout'))
    if S:
        rs = S['per_seed']
        rows = [(f"test MAE, mean of {len(rs)} training seeds ({', '.join(str(r['seed']) for r in rs)}): agenb / a plain "
                 'PyTorch loop / the oracle (image level, one muscle)',
                 f"{_n(S['test_mae_mean'])} / {_n(S.get('plain_test_mae_mean'))} / {_n(A['oracle_mae_test_images'])} years"),
                ('test MAE per seed: agenb / plain loop', '; '.join(f"{_n(r['test_mae'])} / {_n(r.get('plain_test_mae'))}" for r in rs)),
                ('`mae_over_plain_loop` [95% interval over seeds and test subjects]; target: upper end below 1.0',
                 f"{_seed_ci(S, 'mae_over_plain_loop')}: {_plain_met(_g(S, 'mae_over_plain_loop_ci95', 1))}"),
                ('`mae_over_oracle` [95% interval over seeds and test subjects]; target: at most 1.20',
                 f"{_seed_ci(S, 'mae_over_oracle')}: {_met(S['mae_over_oracle'], 1.20, higher=False)}"),
                ('epochs kept (validation MAE) per seed: agenb / plain loop',
                 '; '.join(f"{r['best_epoch']} ({_n(r['best_val_mae'])}) / {r.get('plain_best_epoch')} ({_n(r.get('plain_best_val_mae'))})" for r in rs))]
        noise = (f"{len(rs)} training seeds each, all on the split of seed {rs[0]['seed']}: the intervals resample each "
                 'side\'s seeds and the test subjects (agenb.stats.boot_means), so they cover the training\'s noise as '
                 'well as the test set\'s.')
    else:
        rows = [
            ('test MAE: agenb / a plain PyTorch loop / the oracle (image level, one muscle)',
             f"{_n(A['test_mae'])} / {_n(P.get('test_mae'))} / {_n(A['oracle_mae_test_images'])} years"),
            ('`mae_over_plain_loop` [95% interval over test subjects]; target: upper end below 1.0',
             f"{_ci(A, 'mae_over_plain_loop')}: {_plain_met(_g(A, 'ratio_ci95', 'mae_over_plain_loop', 1))}"),
            ('`mae_over_oracle` [95% interval]; target: at most 1.20', f"{_ci(A, 'mae_over_oracle')}: {_met(A['mae_over_oracle'], 1.20, higher=False)}"),
            ('epoch kept (validation MAE): agenb / plain loop',
             f"{A['best_epoch']} ({_n(A['best_val_mae'])}) / {P.get('best_epoch')} ({_n(P.get('best_val_mae'))})"),
        ]
        noise = ('One training seed each: the intervals cover the test set\'s sampling, not the training\'s seed '
                 '(`bench/defaults/` has the seed-aware comparisons).')
    return '\n'.join([
        (f"| accuracy section alone (`bench/{source}`) | result |" if source != RESULTS.name else
         f"| accuracy section of `make bench` (`bench/{source}`) | result |"), '|---|---|',
        *[f'| {a} | {b} |' for a, b in rows], '',
        f"{s['arch']} from scratch, {s['image_size']} px, {s['epochs']} epochs, batch {s['batch_size']}, agenb's mae recipe "
        f"with {opts} (the plain loop: the same model, size, batch, epochs, rate and weight decay, nothing else); "
        f"{A['n_test_subjects']} test subjects ({A['n_test_images']} images) of the bench data, agenb.synth version "
        f"{fp.get('version')}. Commit `{(ag.get('commit') or '?')[:10]}` with {tree}, {m.get('cpu_model')} "
        f"({m.get('cores')} cores), {_minutes(_g(acc, 'section_seconds', 'accuracy'))}. " + noise])

def ensemble_block(res, source=ENSEMBLE.name) -> str:
    """The fold ensemble beside the single models (section `ensemble` of bench/run.py): image-level test MAE of each over
    the oracle's on the same test images, with intervals, and the ensemble minus the single models per test subject."""
    E, ag, fp, m = res['ensemble'], res.get('agenb') or {}, _g(res, 'data', 'fingerprint') or {}, res.get('machine') or {}
    S, F, d, o = E['single'], E['fold_ensemble'], E['ensemble_minus_single_subject_mae'], E['options']
    rows = [(f"single model trained on all development subjects, mean of {S['n_models']} training seeds "
             f"({', '.join(map(str, S['seeds']))}): test MAE (per seed) / over the oracle [95% interval]",
             f"{_n(S['test_mae'])} ({', '.join(map(_n, S['test_mae_per_seed']))}) / {_over_oracle(S)}"),
            (f"fold ensemble ({F['n_models']} fold models, what `experiment predict` uses): test MAE / over the oracle "
             '[95% interval]', f"{_n(F['test_mae'])} / {_over_oracle(F)}"),
            ('the oracle on the same test images', f"{_n(E['oracle_test_mae'])} years"),
            ('ensemble minus single models, subject-level test MAE [95% interval], as `experiment final` reports it',
             f"{d['diff']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] years")]
    return '\n'.join([
        f"| fold ensemble beside single models (`{source}`) | result |", '|---|---|',
        *[f'| {a} | {b} |' for a, b in rows], '',
        f"The `{E['variant']}` variant of `{E['spec']}` ({o.get('arch')} from scratch, {o.get('image_size')} px, "
        f"{o.get('epochs')} epochs, lr {o.get('lr'):g}) cross-validated by `python -m "
        f"agenb.experiment run` ({E['folds']} folds x {len(E['seeds'])} seeds; out-of-fold subject MAE "
        f"{_n(E.get('oof_subject_mae'))}), then its test set opened once by `experiment "
        f"final` (opening {E['opening']}): {E['n_test_images']} test images of {E['n_test_subjects']} subjects, image level, "
        f"one muscle; intervals: {E['method']}. Data agenb.synth version {fp.get('version')}; commit "
        f"`{(ag.get('commit') or '?')[:10]}`{' with uncommitted changes' if ag.get('dirty') else ''}, {m.get('cpu_model')} "
        f"({m.get('cores')} cores), {_minutes(_g(res, 'section_seconds', 'ensemble'))}."])

def stale_note(fp) -> str:
    "A sentence saying that the figures predate the current generator, when they do (empty otherwise)."
    from agenb.synth import GENERATOR_VERSION
    if fp.get('version') == GENERATOR_VERSION: return ''
    return (f" **These figures predate the current generator (version {GENERATOR_VERSION}, calibrated to the real images' "
            "published statistics): they were measured on other data, and `make bench` has not been re-run since.**"
            + (' The accuracy section alone was, on the current data: see below.' if _current(ACCURACY) else ''))

def detail_source(name, res):
    """(path, results) of the `accuracy` or `ensemble` detail block: of `make bench`'s own results (when they hold that
    section: the accuracy section with its training seeds) and the section run alone (bench/accuracy_results.json,
    bench/ensemble_results.json, if there is one), the newer of those measured on the current generator's data, else
    the newer of the two; None when neither holds the section."""
    from agenb.synth import GENERATOR_VERSION
    held = _g(res, 'accuracy', 'seeds') if name == 'accuracy' else _g(res, 'ensemble', 'fold_ensemble')
    alone = ACCURACY if name == 'accuracy' else ENSEMBLE
    found = ([(RESULTS, res)] if held else []) + ([(alone, json.loads(alone.read_text()))] if alone.is_file() else [])
    current = [f for f in found if _g(f[1], 'data', 'fingerprint', 'version') == GENERATOR_VERSION]
    return max(current or found, key=lambda f: _g(f[1], 'machine', 'date') or '', default=None)

def _current(path) -> bool:
    "Whether a results file exists and was measured on data of the current generator."
    from agenb.synth import GENERATOR_VERSION
    if not Path(path).is_file(): return False
    return _g(json.loads(Path(path).read_text()), 'data', 'fingerprint', 'version') == GENERATOR_VERSION

def demo_block(rec) -> str:
    "The README's demo paragraph and the lines `make demo` ends with, from bench/demo_record.json (bench/demo.py)."
    s, m, d = rec['settings'], rec['machine'], rec['data']
    la = m.get('loadavg_at_start')
    seen = ', '.join(f"{o['mae']:.2f} on {o['cpu']} (generator version {o['synth_version']})" for o in rec['cpu_spread'])
    spread = max(o['mae'] for o in rec['cpu_spread']) - min(o['mae'] for o in rec['cpu_spread'])
    return '\n'.join([
        f"`make demo` then takes about {rec['seconds'] / 60:.1f} minutes on a {m.get('usable_cores') or m['cores']}-core CPU "
        f"({'generating the data included' if rec['generated_data'] else 'the data already generated'}; "
        f"{s['arch']} from scratch at {s['image_size']} px, {s['epochs']} epochs, on {d['subjects']} synthetic subjects) "
        'and ends with', '', '```',
        'Demo run:      runs/run_YYYYMMDD_HHMMSS',
        f"Test metrics:  MAE {rec['mae']:.2f} years (always predicting the training mean: {rec['baseline_mae']:.2f})",
        'Report:        runs/run_YYYYMMDD_HHMMSS/report.html  (open it in a browser)', '```', '',
        f"Recorded by `python bench/demo.py` (`bench/demo_record.json`) at commit `{(rec['agenb'].get('commit') or '?')[:10]}` "
        f"on {m['cpu_model']} ({m['cores']} cores{f', load average {la[0]} at the start' if la else ''}), data of "
        f"agenb.synth version {d['synth_version']}. Your figures will differ: the duration scales with your cores, and "
        'the MAE depends on the CPU model, because float32 training on CPU threads sums in a different order on '
        f'another CPU and 25 epochs amplify the last bits. Earlier demos of one commit gave {seen}: expect your MAE '
        f"within about {spread:.1f} years of the figure above."])

def fill(text, name, body):
    "Replace what lies between `<!-- name:begin -->` and `<!-- name:end -->` in `text` by `body`."
    pat = re.compile(rf'(<!-- {name}:begin -->).*?(<!-- {name}:end -->)', re.S)
    if not pat.search(text): raise SystemExit(f'render: no <!-- {name}:begin --> ... <!-- {name}:end --> block to fill')
    return pat.sub(lambda m: m.group(1) + '\n' + body.strip('\n') + '\n' + m.group(2), text, count=1)

def update_readme(path=README, res=None, name='results', body=None):
    """Rewrite the marked block of `path` from `res` (default: bench/results.json). In a notebook (.ipynb) the block
    is looked for in the markdown cells, so that a README generated from the notebook carries it."""
    res = res if res is not None else json.loads(RESULTS.read_text())
    body = body if body is not None else bench_block(res)
    path = Path(path)
    text = path.read_text()
    if path.suffix == '.ipynb':
        nb = json.loads(text)
        cells = [c for c in nb['cells'] if c['cell_type'] == 'markdown' and f'<!-- {name}:begin -->' in ''.join(c['source'])]
        if not cells: raise SystemExit(f'render: no markdown cell of {path} holds a <!-- {name}:begin --> block')
        new_src = fill(''.join(cells[0]['source']), name, body)
        cells[0]['source'] = new_src.splitlines(keepends=True)
        new = json.dumps(nb, indent=1, ensure_ascii=False) + '\n'
    else:
        new = fill(text, name, body)
    if new != text: path.write_text(new)
    return new

def render_all(res, readme=None):
    """Every generated block of bench/README.md (and of `readme`, the project README's source, if given) from `make
    bench`'s results `res`, the accuracy and ensemble details from `detail_source`."""
    update_readme(README, res)
    if readme: update_readme(readme, res, 'bench', summary(res))
    for name, block in (('accuracy', accuracy_block), ('ensemble', ensemble_block)):
        src = detail_source(name, res)
        if src is None: continue
        body = block(src[1], src[0].name)
        update_readme(README, src[1], name, body)
        if readme: update_readme(readme, src[1], name, body)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--results', default=str(RESULTS), help='results file (default bench/results.json)')
    p.add_argument('--readme', help='also fill the <!-- bench:begin/end --> block of this file with the summary')
    p.add_argument('--summary', action='store_true', help='print the summary markdown and change nothing')
    a = p.parse_args(argv)
    res = json.loads(Path(a.results).read_text())
    if a.summary:
        print(summary(res)); return 0
    render_all(res, a.readme)
    return 0

if __name__ == '__main__':
    sys.exit(main())
