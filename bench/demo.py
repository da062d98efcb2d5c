#!/usr/bin/env python
"""Record `make demo` so that the README's demo figures are produced, not typed.

    python bench/demo.py            # run `make demo`, time it, write bench/demo_record.json, render the README block

It runs `make demo` exactly as a user would (the venv must exist: the install is not part of the figure), times the
whole command, reads the run's metrics.json and config.json, and records them with the machine (CPU model, cores,
load average) and the agenb commit in bench/demo_record.json. bench/render.py's `demo_block` turns the record into
the README's <!-- demo:begin/end --> block (in nbs/index.ipynb, then `make readme`); tests/test_bench.py fails
when the README and the record disagree.

The MAE is not the same on every CPU: the demo trains with float32 on CPU threads, and the order in which a CPU
model's kernels sum (vector width, thread count) changes the last bits of every step, which 25 epochs amplify.
`CPU_SPREAD` holds what was seen on other machines, and the block says how much the figure moves.
"""
import json, os, re, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'bench'))
import render  # noqa: E402
from run import machine_info, rel  # noqa: E402

RECORD = ROOT / 'bench' / 'demo_record.json'
# `make demo` on other CPUs, same commit and data (issue 28): the figure moves by about half a year between CPU models.
CPU_SPREAD = [{'cpu': 'AMD EPYC (2 cores)', 'mae': 8.23, 'synth_version': 3},
              {'cpu': 'Intel Xeon (2 cores)', 'mae': 8.72, 'synth_version': 3}]


def record():
    sys.path.insert(0, str(ROOT))
    from agenb.core import git_info
    m = machine_info()
    t0 = time.time()
    r = subprocess.run(['make', 'demo'], cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - t0
    if r.returncode: sys.exit(f'make demo failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}')
    run = Path(re.search(r'^Demo run:\s+(\S+)', r.stdout, re.M).group(1))
    run = run if run.is_absolute() else ROOT / run
    met, cfg = (json.loads((run / f).read_text()) for f in ('metrics.json', 'config.json'))
    meta = json.loads((ROOT / 'data' / 'demo' / 'synth_meta.json').read_text())
    rec = {'mae': round(met['overall']['mae'], 2), 'baseline_mae': round(met['baseline']['mae'], 2),
           'seconds': round(seconds, 1), 'generated_data': 'generating' in r.stdout,
           'settings': {k: cfg['args'][k] for k in ('arch', 'image_size', 'epochs', 'pretrained', 'lr', 'warmup_epochs')},
           'data': {'subjects': meta['counts']['TA']['Healthy']['subjects'], 'synth_version': meta['version']},
           'machine': m, 'loadavg_at_end': [round(x, 2) for x in os.getloadavg()],
           'agenb': git_info(ROOT), 'run': rel(run), 'cpu_spread': CPU_SPREAD}
    RECORD.write_text(json.dumps(rec, indent=1) + '\n')
    render.update_readme(ROOT / 'nbs' / 'index.ipynb', rec, 'demo', render.demo_block(rec))
    subprocess.run(['make', 'readme'], cwd=ROOT, check=True, capture_output=True)
    print(render.demo_block(rec))
    return rec


if __name__ == '__main__':
    record()
