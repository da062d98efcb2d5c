#!/usr/bin/env python
"""One leaderboard from variants of several experiments that share a protocol, so that a new candidate needs only its
own fold runs: the baseline's runs of an earlier experiment are reused, not trained again.

    python bench/defaults/combine.py NAME EXP_DIR:VARIANT [EXP_DIR:VARIANT ...] --baseline VARIANT [--base-may-differ KEY]...
    -> bench/defaults/NAME_leaderboard.csv (committed) and bench/out/NAME_oof.csv (+ comparison.html)

The pooling is refused (one line, exit 2) unless every source has the same subjects in the same folds, the same
images, the same seeds and the same experiment-level settings apart from the variants' own options (the
protocol, test subjects, folds and data fingerprint of each experiment.json, and the spec's `base`): then the variants differ
only in their options, exactly as within one experiment. The leaderboard is agenb's own
(agenb.exp_report.compare_oof), and each row's `options` are the variant's options from its experiment.
`--base-may-differ KEY` lets the spec's base differ in KEY (e.g. `weights`: fine-tuned against trained from scratch);
each row's options then carry its experiment's value of KEY, so the board says what differs.
"""
import argparse, json, sys
from pathlib import Path

import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(HERE))
from board import write_leaderboard  # noqa: E402  (bench/defaults/board.py)

SAME = ('protocol', 'test_subjects', 'folds', 'data_fingerprint')   # experiment.json keys that must agree


def fail(msg):
    print(f'combine: {msg}', file=sys.stderr)
    sys.exit(2)


def source(arg):
    "(exp_dir, variant, its OOF rows, its options as JSON text, the spec) of one EXP_DIR:VARIANT argument."
    exp, _, variant = arg.rpartition(':')
    exp = Path(exp)
    if not variant or not (exp / 'oof_predictions.csv').is_file():
        fail(f'{arg}: give EXP_DIR:VARIANT with an experiment folder that holds oof_predictions.csv')
    oof = pd.read_csv(exp / 'oof_predictions.csv', dtype={'subject': str, 'variant': str})
    oof = oof[oof['variant'] == variant]
    if oof.empty: fail(f'{exp}/oof_predictions.csv has no rows of variant {variant}')
    board = pd.read_csv(exp / 'leaderboard.csv', dtype={'variant': str}) if (exp / 'leaderboard.csv').is_file() else None
    opts = board.loc[board['variant'] == variant, 'options'] if board is not None and 'options' in board else []
    record = json.loads((exp / 'experiment.json').read_text())
    return exp, variant, oof, (opts.iloc[0] if len(opts) else None), record


def base_of(exp) -> dict:
    "The spec's `base` of experiment folder `exp`."
    return (yaml.safe_load((Path(exp) / 'spec.yaml').read_text()) or {}).get('base') or {}


def spec_of(exp, record, free=()) -> dict:
    """What every pooled experiment must share: its protocol, test subjects, folds and data (experiment.json) and its
    spec's base, apart from the base's keys in `free`."""
    return {**{k: record.get(k) for k in SAME}, 'base': {k: v for k, v in base_of(exp).items() if k not in free}}


def pooled(sources, free=()) -> pd.DataFrame:
    "The OOF rows of every source, after checking that they share one protocol (the base's keys in `free` may differ)."
    ref_exp, _, ref, _, ref_rec = sources[0]
    key = lambda d: d[['seed', 'fold', 'subject', 'file', 'age']].sort_values(['seed', 'fold', 'subject', 'file']).reset_index(drop=True)
    for exp, variant, oof, _, rec in sources[1:]:
        if not key(oof).equals(key(ref)):
            fail(f'{exp}:{variant} and {ref_exp} differ in their out-of-fold subjects, folds, images or seeds: they do not share a protocol')
        a, b = spec_of(exp, rec, free), spec_of(ref_exp, ref_rec, free)
        diff = [k for k in a if a[k] != b[k]]
        if diff: fail(f'{exp} and {ref_exp} differ in {", ".join(diff)}: pool only experiments with the same base and protocol')
    names = [v for _, v, *_ in sources]
    if len(set(names)) != len(names): fail(f'a variant name is given twice ({", ".join(names)})')
    return pd.concat([o for _, _, o, _, _ in sources], ignore_index=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('name'); p.add_argument('sources', nargs='+'); p.add_argument('--baseline', required=True)
    p.add_argument('--base-may-differ', action='append', default=[], metavar='KEY',
                   help="a key of the specs' base that may differ (give the flag once per key)")
    a = p.parse_args(argv)
    sources = [source(s) for s in a.sources]
    unknown = [k for k in a.base_may_differ if not any(k in base_of(exp) for exp, *_ in sources)]
    if unknown: fail(f'--base-may-differ {", ".join(unknown)}: no source\'s spec base has that key (misspelt?)')
    oof = pooled(sources, a.base_may_differ)
    write_leaderboard(a.name, oof, a.baseline, {v: with_base(o, exp, a.base_may_differ) for exp, v, _, o, _ in sources})


def with_base(options, exp, keys):
    """A variant's `options` (JSON text or None) with its experiment's base values of `keys` added (JSON text); a
    variant's own value of a key wins, as it did in its run."""
    if not keys: return options
    base = base_of(exp)
    own = json.loads(options) if isinstance(options, str) else {}   # None or NaN: the variant names no options
    return json.dumps(dict(sorted({**{k: base.get(k) for k in keys}, **own}.items())))

if __name__ == '__main__':
    main()
