#!/usr/bin/env python
"""How often is the bench's verdict on issue 27's two targets wrong? `python bench/target_rule.py` ->
bench/target_rule_results.json and a block of bench/README.md.

Issue 27 asks two things of `make bench` (bench/run.py, 3 training seeds a side, 80 test subjects):
- `mae_over_plain_loop`: the upper end of its 95% interval below 1 (bench/run.py's `seeds_ratios`: each side's seeds
  resampled on their own, the test subjects resampled together);
- `mae_over_oracle`: at most 1.20 (the point: the mean over the seeds). Beside it this script counts a rule that
  decides: the upper end of its 95% interval at most 1.20.

A decision rule is only as good as its false-alarm rate, and a target only as useful as the chance of seeing it met
when it is true. This script simulates the bench's design many times, in worlds where the answer is known, and counts
the verdicts. Nothing is trained: it reads finished runs.

**The runs.** The recipe's runs on bench/ceiling.py's 320-subject split (its seeds 1 and 2, and bench/gap.py's seeds 3
and 4), scored on the cohort's 200 held-out subjects (579 images). These are other people than the bench's, drawn by
the same generator, and the recipe at 64 px and 20 epochs (the boards' budget), not at the bench's 96 px and 40
epochs.

**One simulated bench.**
- Its test set: 80 of the 200 held-out subjects, drawn with replacement (new people, as the bench's interval assumes;
  drawn without, the test set's share of the variance would be too small).
- A training seed of a method: the method's mean signed error per image over its runs, plus a new seed's deviation,
  drawn as a Gaussian combination of the runs' deviations from that mean (`z @ D / sqrt(n - 1)`, z ~ N(0, I)). Its
  covariance across images is, in expectation, the runs' (each image's seed variance and the correlation between
  images that a seed shares), so that new seeds vary as the observed ones do.
- The verdicts: bench/run.py's `seeds_ratios` on the simulated per-subject error sums, as `make bench` computes them,
  with the generator's oracle on the same test subjects.

**The worlds.**
- `plain loop rule`: the plain loop is the recipe (the bench finds the two level: 1.03 [0.946, 1.12]), and agenb is
  the recipe with every signed error times k, so its MAE is k times the plain loop's, k = 1 (nothing differs: every
  "met" is a false alarm), 0.95, 0.90, 0.85, and worse: 1.05, 1.10. Such an agenb errs where the plain loop errs, image by image: the best
  case for a paired comparison; a method with errors of its own would pass less often. (The 640-subject runs, what
  twice the people buy, are not a world here: with two runs, their drawn seeds could only vary along the one direction
  in which those two differ.)
- `non-inferiority`: the same worlds judged by a rule the owner might put in the target's place, "not worse than
  the plain loop by more than a margin m": the upper end of the interval below m, for m = 1.05 and 1.10.
- `oracle rule`: the recipe scaled so that its MAE over the oracle's is 1.00 to 1.30, on all 200 subjects.
- `seed noise`: how much seeds vary is estimated from 4 runs (3 degrees of freedom: the true SD may be 0.57 to 3.7
  times the estimate), so the plain-loop rule's null and 10%-better worlds are run again with the seeds' deviations
  times 0.6, 1.5 and 2.5. The share of the runs' noise left in their mean (a quarter of a seed's) raises both sides'
  MAE alike.
The true ratio of each world is the ratio of the methods' expected MAEs over all 200 held-out subjects (seeds drawn
`TRUTH_SEEDS` times).

Rates carry exact 95% binomial intervals (Clopper-Pearson, scipy). About two minutes on a 2-core CPU.
`--render` only renders the block again.
"""
from __future__ import annotations
import argparse, json, sys, time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as st
from agenb import __version__
from agenb.core import file_sha256, git_info

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as B       # bench/run.py: paths, seeds_ratios (the bench's own rule), refuse
import render         # bench/render.py: fills the marked blocks of bench/README.md
import ceiling as C   # bench/ceiling.py: the cohort, its splits and runs

RESULTS = HERE / 'target_rule_results.json'
BENCH_SEEDS, BENCH_SUBJECTS = 3, 80     # bench/run.py's design: training seeds a side, test subjects
PLAIN_FACTORS = (1.0, 0.95, 0.90, 0.85, 1.05, 1.10)
NI_MARGINS = (1.05, 1.10)               # non-inferiority: "not worse" when the upper end is below the margin
ORACLE_RATIOS = (1.00, 1.05, 1.10, 1.15, 1.20, 1.25, 1.30)
ORACLE_TARGET = 1.20
TRUTH_SEEDS = 2000
N_BOOT = 2000                           # bootstrap resamples per bench, as bench/run.py
NOISE_FACTORS = (0.6, 1.5, 2.5)         # the seed noise, estimated from 4 runs (3 degrees of freedom), times these


class Method:
    """A method's signed errors on the held-out images: their mean over its runs, and new seeds drawn like its runs.
    `scale` multiplies every error (a method k times better); `noise` multiplies only the seeds' deviations."""
    def __init__(self, errors, scale=1.0, noise=1.0):
        E = np.atleast_2d(np.asarray(errors, dtype=float))
        if len(E) < 2: raise ValueError('a method needs two runs or more to say how its seeds vary')
        self.mean, self.dev, self.scale, self.noise = E.mean(0), E - E.mean(0), scale, noise

    def scaled(self, k=1.0, noise=1.0) -> 'Method':
        "The same method with every error times `k` and its seeds' deviations times `noise` (on top of its own)."
        m = Method.__new__(Method)
        m.mean, m.dev, m.scale, m.noise = self.mean, self.dev, self.scale * k, self.noise * noise
        return m

    def seeds(self, n, rng) -> np.ndarray:
        "(n, images) signed errors of n new training seeds."
        z = rng.standard_normal((n, len(self.dev)))
        return self.scale * (self.mean + self.noise * (z @ self.dev) / np.sqrt(len(self.dev) - 1))


def subject_sums(abs_err, codes, n_subjects) -> np.ndarray:
    "(seeds, subjects): per subject, the sum of the absolute errors over its images."
    return np.stack([np.bincount(codes, a, minlength=n_subjects) for a in np.atleast_2d(abs_err)])


def seed_maes(m: Method, n_seeds=TRUTH_SEEDS, seed=0) -> np.ndarray:
    "A method's image MAE over all held-out images for each of `n_seeds` drawn training seeds."
    return np.abs(m.seeds(n_seeds, np.random.default_rng(seed))).mean(1)


def binom(k, n) -> dict:
    "A count, its rate and the exact (Clopper-Pearson) 95% interval."
    ci = st.binomtest(int(k), int(n)).proportion_ci(0.95, method='exact')
    return {'count': int(k), 'n': int(n), 'rate': round(k / n, 4), 'ci95': [round(ci.low, 4), round(ci.high, 4)]}


def simulate(agenb: Method, plain: Method, oracle_err, codes, n_sims, n_boot=N_BOOT, seed=0,
             seeds=BENCH_SEEDS, subjects=BENCH_SUBJECTS) -> dict:
    """`n_sims` simulated benches: per bench, `subjects` test subjects of the held-out ones and `seeds` new seeds of each
    method, scored by bench/run.py's `seeds_ratios`. Returns the verdicts of both rules and the spread of the points."""
    rng = np.random.default_rng(seed)
    n_subj = int(codes.max()) + 1
    o_sums = subject_sums(np.abs(oracle_err), codes, n_subj)
    n_img = np.bincount(codes, minlength=n_subj)
    met = worse = oracle_met = oracle_upper = 0
    ni = dict.fromkeys(NI_MARGINS, 0)
    points, o_points, widths, seed_var = [], [], [], []
    for i in range(n_sims):
        pick = rng.choice(n_subj, subjects, replace=True)        # new people, as the bench's interval assumes
        cubes = {'agenb': subject_sums(np.abs(agenb.seeds(seeds, rng)), codes, n_subj)[:, pick],
                 'plain': subject_sums(np.abs(plain.seeds(seeds, rng)), codes, n_subj)[:, pick],
                 'oracle': o_sums[:, pick]}
        seed_var.append(np.var(cubes['plain'].sum(1) / n_img[pick].sum(), ddof=1))
        r = B.seeds_ratios(cubes, n_boot, seed=int(rng.integers(2**31)))
        lo, hi = r['mae_over_plain_loop_ci95']
        met += hi < 1.0; worse += lo > 1.0
        for m in ni: ni[m] += hi < m
        oracle_met += r['mae_over_oracle'] <= ORACLE_TARGET
        oracle_upper += r['mae_over_oracle_ci95'][1] <= ORACLE_TARGET
        points.append(r['mae_over_plain_loop']); o_points.append(r['mae_over_oracle']); widths.append(hi - lo)
    return {'plain_rule_met': binom(met, n_sims), 'plain_rule_worse': binom(worse, n_sims),
            'oracle_rule_met': binom(oracle_met, n_sims), 'oracle_interval_rule_met': binom(oracle_upper, n_sims),
            'non_inferior': {f'{m:g}': binom(c, n_sims) for m, c in ni.items()},
            'mae_over_plain_loop': {'mean': round(float(np.mean(points)), 4), 'sd': round(float(np.std(points, ddof=1)), 4),
                                    'median_ci_width': round(float(np.median(widths)), 4)},
            'mae_over_oracle': {'mean': round(float(np.mean(o_points)), 4), 'sd': round(float(np.std(o_points, ddof=1)), 4)},
            'plain_seed_sd_on_test_set': round(float(np.sqrt(np.mean(seed_var))), 4)}


def worlds(recipe: Method, oracle_err, codes, n_sims, n_boot=N_BOOT) -> dict:
    "Every world of the docstring: its true ratios and its simulated verdicts."
    maes = seed_maes(recipe)
    truth = {'recipe': float(maes.mean()), 'oracle': float(np.abs(oracle_err).mean())}
    out = {'plain_loop_rule': [], 'oracle_rule': []}
    for i, k in enumerate(PLAIN_FACTORS):
        out['plain_loop_rule'].append({'world': f'agenb = recipe x {k:g}', 'true_mae_over_plain_loop': k,
                                       **simulate(recipe.scaled(k), recipe, oracle_err, codes, n_sims, n_boot, seed=100 + i)})
    base = truth['recipe'] / truth['oracle']
    for i, target in enumerate(ORACLE_RATIOS):
        m = recipe.scaled(target / base)
        out['oracle_rule'].append({'world': f'agenb = recipe x {target / base:.3f}', 'true_mae_over_oracle': target,
                                   **simulate(m, recipe, oracle_err, codes, n_sims, n_boot, seed=200 + i)})
    out['seed_noise'] = []
    for i, f in enumerate(NOISE_FACTORS):
        for j, k in enumerate((1.0, 0.90)):
            out['seed_noise'].append({'noise': f, 'true_mae_over_plain_loop': k,
                                      **simulate(recipe.scaled(k, f), recipe.scaled(1.0, f), oracle_err, codes, n_sims,
                                                 n_boot, seed=300 + 10 * i + j)})
    out['truth'] = {k: round(v, 4) for k, v in truth.items()}
    out['drawn_seed_sd'] = round(float(maes.std(ddof=1)), 4)
    out['recipe_over_oracle'] = round(base, 4)
    return out


def target_block(res) -> str:
    "The README block: both rules' verdict rates per world."
    pct = lambda b: f"{100 * b['rate']:.1f}% [{100 * b['ci95'][0]:.1f}, {100 * b['ci95'][1]:.1f}]"
    n = res['n_sims']
    lines = [f"{n} simulated benches per world ({res['design']['seeds']} training seeds a side, {res['design']['subjects']} "
             f"test subjects drawn with replacement from the {res['n_subjects']} held-out subjects, "
             f"{res['design']['n_boot']} bootstrap resamples each, as bench/run.py); rates with exact 95% intervals "
             "(of the simulation's own error only).", '',
             '`mae_over_plain_loop`: "met" = the upper end of its 95% interval below 1; "worse" = the lower end above 1.', '',
             '| world | true ratio | met | worse | point: mean (SD) | interval width (median) |',
             '|---|---|---|---|---|---|']
    for w in sorted(res['worlds']['plain_loop_rule'], key=lambda w: -w['true_mae_over_plain_loop']):
        p = w['mae_over_plain_loop']
        lines.append(f"| {w['world']} | {w['true_mae_over_plain_loop']:.3f} | {pct(w['plain_rule_met'])} | "
                     f"{pct(w['plain_rule_worse'])} | {p['mean']:.3f} ({p['sd']:.3f}) | {p['median_ci_width']:.3f} |")
    margins = list(res['worlds']['plain_loop_rule'][0]['non_inferior'])
    lines += ['', 'Non-inferiority, a rule that could replace the target: "not worse than the plain loop by more than m" '
                  'when the upper end is below m. Where the true ratio is m or more, every "met" is a false alarm.', '',
              '| true ratio | ' + ' | '.join(f'met with m = {m}' for m in margins) + ' |', '|---' * (len(margins) + 1) + '|']
    for w in sorted(res['worlds']['plain_loop_rule'], key=lambda w: -w['true_mae_over_plain_loop']):
        lines.append(f"| {w['true_mae_over_plain_loop']:.2f} | " + ' | '.join(pct(w['non_inferior'][m]) for m in margins) + ' |')
    lines += ['', f"`mae_over_oracle` at most {ORACLE_TARGET:.2f}: \"met\" by the point (the issue's rule), and by the upper "
                  f"end of its 95% interval. The recipe on these subjects: {res['worlds']['recipe_over_oracle']:.3f}.", '',
              '| world | true ratio | met (point) | met (upper end) | point: mean (SD) |', '|---|---|---|---|---|']
    for w in res['worlds']['oracle_rule']:
        p = w['mae_over_oracle']
        lines.append(f"| {w['world']} | {w['true_mae_over_oracle']:.2f} | {pct(w['oracle_rule_met'])} | "
                     f"{pct(w['oracle_interval_rule_met'])} | {p['mean']:.3f} ({p['sd']:.3f}) |")
    runs, w0, bench = res['observed_image_mae_per_run'], res['worlds']['plain_loop_rule'][0], res['bench_seed_sd']
    lines += ['', f"How much the seeds vary decides much of this, and it is estimated from {len(runs)} runs "
                  f"({', '.join(f'{x:.2f}' for x in runs)}; SD {res['observed_seed_sd']:.3f} years on the "
                  f"{res['n_subjects']} subjects, {res['worlds']['drawn_seed_sd']:.3f} over drawn seeds). Within a simulated "
                  f"bench the 3 seeds of one side differ by an SD of {w0['plain_seed_sd_on_test_set']:.3f} years on its "
                  f"{res['design']['subjects']} subjects; on the bench itself agenb's differed by {bench['agenb']:.3f} and "
                  f"the plain loop's by {bench['plain']:.3f} (bench/results.json). The same rule with the seeds' deviations "
                  "times a factor:", '',
              '| seed noise | false "met" where nothing differs | "met" at 10% better | seeds\' SD within a bench |',
              '|---|---|---|---|']
    noise = {(w['noise'], w['true_mae_over_plain_loop']): w for w in res['worlds']['seed_noise']}
    for f in sorted({k[0] for k in noise} | {1.0}):
        null = noise.get((f, 1.0)) or res['worlds']['plain_loop_rule'][0]
        gain = noise.get((f, 0.9)) or next(w for w in res['worlds']['plain_loop_rule'] if w['true_mae_over_plain_loop'] == 0.9)
        lines.append(f"| x {f:g}{' (as estimated)' if f == 1.0 else ''} | {pct(null['plain_rule_met'])} | "
                     f"{pct(gain['plain_rule_met'])} | {null['plain_seed_sd_on_test_set']:.3f} |")
    lines += ['', f"{res['wall_seconds']:.0f} s."]
    return '\n'.join(lines)


def bench_seed_sd() -> dict:
    "SD of the test MAE over make bench's training seeds, agenb's and the plain loop's (bench/results.json)."
    per_seed = json.loads(render.RESULTS.read_text())['accuracy']['seeds']['per_seed']
    return {k: round(float(np.std([r[key] for r in per_seed], ddof=1)), 4)
            for k, key in (('agenb', 'test_mae'), ('plain', 'plain_test_mae'))}


def load_runs(j):
    "Signed errors on the held-out images `j` of the recipe's runs (320 subjects, seeds 1 to 4), and their folders."
    ceil = json.loads(C.RESULTS.read_text())
    gap = json.loads((HERE / 'gap_results.json').read_text())
    dirs = [r['run_dir'] for r in ceil['runs'] if r['n'] == 320] + [r['run_dir'] for r in gap['recipe_extra_seeds']['runs']]
    errs = []
    for d in dirs:
        f = B.ROOT / d / 'predictions.csv'
        if not f.is_file():
            B.refuse(f'target_rule: {d}/predictions.csv is missing: run python bench/ceiling.py and python bench/gap.py first')
        p = j.filename.map(pd.read_csv(f).set_index('filename').pred).to_numpy(dtype=float)
        if not np.isfinite(p).all(): B.refuse(f'target_rule: {d} did not predict every held-out image: train it again')
        errs.append(p - j.age.to_numpy())
    return errs, dirs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sims', type=int, default=5000, help='simulated benches per world (default: %(default)s)')
    p.add_argument('--render', action='store_true', help='only render bench/README.md\'s block again from the results')
    a = p.parse_args(argv)
    if a.render:
        if not RESULTS.is_file(): B.refuse(f'target_rule: {B.rel(RESULTS)} is missing: run python bench/target_rule.py first')
        render.update_readme(render.README, None, 'target_rule', target_block(json.loads(RESULTS.read_text())))
        return print(f'rendered from {B.rel(RESULTS)}')
    if a.sims < 100: B.refuse(f'target_rule: --sims {a.sims} is too few for a rate near 2.5%: give 100 or more')
    t0, agenb = time.time(), {'version': __version__, **git_info(B.ROOT)}
    ceil = json.loads(C.RESULTS.read_text())
    cohort_root, split = B.OUT / 'data_ceiling', B.OUT / 'ceiling_runs' / 'split_320.csv'
    for f in (cohort_root / 'synth_latents.csv', split):
        if not f.is_file(): B.refuse(f'target_rule: {B.rel(f)} is missing: run python bench/ceiling.py and python bench/gap.py first')
    if file_sha256(split) not in {r['split_sha256'] for r in ceil['runs'] if r['n'] == 320}:
        B.refuse(f'target_rule: {B.rel(split)} is not the split the runs were trained on: run python bench/ceiling.py again')
    held = pd.read_csv(split, dtype={'subject': str}).query("split == 'test'").subject
    j = C.scored_images(cohort_root, held)
    codes = np.unique(j.subject.astype(str).to_numpy(), return_inverse=True)[1]
    errs, dirs = load_runs(j)
    recipe = Method(errs)
    oracle_err = j.oracle.to_numpy(dtype=float) - j.age.to_numpy()
    observed = [round(float(np.abs(e).mean()), 3) for e in errs]
    res = {'what': "issue 27: the false-alarm rate and the power of the bench's two accuracy verdicts, by simulating "
                   "bench/run.py's design on bench/ceiling.py's held-out subjects",
           'design': {'seeds': BENCH_SEEDS, 'subjects': BENCH_SUBJECTS, 'n_boot': N_BOOT,
                      'rule': 'bench/run.py seeds_ratios: each side\'s seeds resampled on their own, the test subjects together'},
           'n_sims': a.sims, 'n_images': len(j), 'n_subjects': int(j.subject.nunique()),
           'runs': [str(d) for d in dirs], 'observed_image_mae_per_run': observed,
           'observed_seed_sd': round(float(np.std(observed, ddof=1)), 4), 'bench_seed_sd': bench_seed_sd(),
           'worlds': worlds(recipe, oracle_err, codes, a.sims),
           'agenb': agenb, 'command': ' '.join(['bench/target_rule.py', *(argv if argv is not None else sys.argv[1:])]),
           'created_at': datetime.now().isoformat(timespec='seconds'), 'wall_seconds': round(time.time() - t0, 1)}
    RESULTS.write_text(json.dumps(res, indent=1) + '\n')
    block = target_block(res)
    print(block)
    render.update_readme(render.README, res, 'target_rule', block)
    print(f'wrote {B.rel(RESULTS)}')


if __name__ == '__main__':
    main()
