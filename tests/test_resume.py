"""Reliability: exact resume after kill -9, SIGTERM, NaN, truncated checkpoints, under 1 and 2 processes."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from conftest import TINY, agenb, probe, probe_log, run_cmd, ROOT

THREE = [*TINY, '--epochs', '3', '--no-report']


def _run_dir(r):
    return Path(r.stdout.strip().splitlines()[-1])


def _same_history(a, b):
    ha, hb = (json.loads((d / 'history.json').read_text()) for d in (a, b))
    assert len(ha) == len(hb)
    for x, y in zip(ha, hb):
        for k in ('train_loss', 'val_loss', 'val_mae', 'val_rmse', 'lr'):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-7), (x['epoch'], k)


def _same_weights(a, b, name='last.pth'):
    wa, wb = (torch.load(d / name, weights_only=True)['model'] for d in (a, b))
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6), k


# Epoch 1 is made the best by shifting every rank's validation predictions of epochs 2 and 3 (tests/train_probe.py):
# a resume that forgot the best MAE so far would call epoch 2 an improvement and overwrite best_model.pth.
WORSE_LATER = json.dumps({f'{r}:{e}': off for r in (0, 1) for e, off in ((2, 500.0), (3, 300.0))})


@pytest.mark.parametrize('nproc,kill', [pytest.param(1, {'AGENB_PROBE_KILL_WRITE': 'last.pth:2'}, marks=pytest.mark.slow),   # SIGKILL half-way through last.pth
                                        (2, {'AGENB_FAULT': 'kill:0:2:2'})])          # SIGKILL rank 0 at epoch 2, step 2
def test_kill_9_then_resume_equals_uninterrupted(data_args, tmp_path, nproc, kill):
    env = {'AGENB_PROBE_VAL_OFFSET': WORSE_LATER}
    full = probe(*data_args, *THREE, '--output-dir', tmp_path / 'full', nproc=nproc, env=env, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = probe(*data_args, *THREE, '--output-dir', tmp_path / 'killed', nproc=nproc, env={**env, **kill}, timeout=300)
    assert killed.returncode != 0
    (run,) = list((tmp_path / 'killed').iterdir())
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['status'] == 'running' and cfg['epochs_completed'] == 1  # a killed run cannot update its status
    assert torch.load(run / 'last.pth', weights_only=True)['epoch'] == 1
    if 'AGENB_PROBE_KILL_WRITE' in kill: assert list(run.glob('.last.pth.*.tmp'))   # the half-written file is there
    log = tmp_path / 'log'
    resumed = probe('--resume', run, nproc=nproc, env={**env, 'AGENB_PROBE_LOG': str(log)}, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _run_dir(resumed) == run
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['status'] == 'completed' and len(cfg['resumes']) == 1 and cfg['resumes'][0]['from_epoch'] == 1
    assert (cfg['resumes'][0]['world_size'], cfg['resumes'][0]['previous_world_size']) == (nproc, nproc)
    assert not [p.name for p in run.iterdir() if p.name.endswith('.tmp')]       # nothing half-written left behind
    _same_history(_run_dir(full), run)
    _same_weights(_run_dir(full), run)
    # the best model is still epoch 1's, as in the uninterrupted run, and the ranks agreed on every decision
    for d in (_run_dir(full), run):
        ck = torch.load(d / 'best_model.pth', weights_only=True)
        assert ck['epoch'] == 1 and json.loads((d / 'config.json').read_text())['best_epoch'] == 1
    _same_weights(_run_dir(full), run, 'best_model.pth')
    decisions = probe_log(log)
    assert len(decisions) == nproc and all(d == decisions[0] for d in decisions.values())
    *epochs, stop, closed = decisions[0]
    assert [(e['epoch'], e['improved'], e['best_epoch']) for e in epochs] == [(2, False, 1), (3, False, 1)]
    assert stop == {'stop': 'max_epochs', 'epoch': 3}
    if nproc == 2:   # each rank freed its wrapper and the group before the shutdown (the abort CI once saw here)
        assert closed == {'closed': True, 'ddp_wrapper_freed': True, 'group_freed': True, 'process_group': False}
    else: assert closed == {'closed': True, 'ddp_wrapper_freed': False, 'group_freed': False, 'process_group': False}


def test_resume_under_another_world_size(tiny_run, tmp_path):
    "A 1-process run resumed by 2 processes continues from its weights; the record says the world size changed."
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run)
    cfg = json.loads((run / 'config.json').read_text()); cfg['status'] = 'interrupted'; cfg['args']['epochs'] = 3
    (run / 'config.json').write_text(json.dumps(cfg))
    before = json.loads((run / 'history.json').read_text())
    r = run_cmd([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'agenb.train',
                 '--resume', run, '--no-report', '--gradcam-n', '0'], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['status'] == 'completed' and cfg['epochs_completed'] == 3 and cfg['world_size'] == 2
    assert cfg['resumes'][-1] | {'at': None} == {'at': None, 'from_epoch': 2, 'previous_status': 'interrupted',
                                                  'world_size': 2, 'previous_world_size': 1}
    assert cfg['training']['effective_batch_size'] == 32
    h = json.loads((run / 'history.json').read_text())
    assert h[:2] == before and [e['epoch'] for e in h] == [1, 2, 3]


def test_sync_bn_on_the_cpu_is_refused(data_args, tmp_path):
    r = run_cmd([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'agenb.train',
                 *data_args, *TINY, '--sync-bn', '--output-dir', tmp_path / 'runs'], timeout=180)
    assert r.returncode != 0
    assert 'agenb: error: --sync-bn needs CUDA' in r.stderr
    assert 'rank0]: Traceback' not in r.stderr and 'SyncBatchNorm layers' not in r.stderr   # torchrun's own report aside
    assert r.stderr.count('agenb: error') == 1                                   # said once, by rank 0
    assert not (tmp_path / 'runs').exists() or not any((tmp_path / 'runs').iterdir())


def test_sigterm_records_interrupted_and_keeps_last_pth(data_args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    p = subprocess.Popen([sys.executable, '-m', 'agenb.train', *data_args, *TINY, '--epochs', '200', '--no-report',
                          '--output-dir', str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob('*/last.pth')): time.sleep(0.5)
    assert list(tmp_path.glob('*/last.pth')), 'no epoch finished in time'
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    (run,) = list(tmp_path.iterdir())
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['status'] == 'interrupted' and 'SIGTERM' in cfg['error']
    assert torch.load(run / 'last.pth', weights_only=True)['epoch'] >= 1
    assert '--resume' in err


def test_nan_loss_stops_with_message_and_keeps_checkpoint(data_args, tmp_path):
    r = agenb('train', *data_args, *THREE, '--output-dir', tmp_path, env={'AGENB_FAULT': 'nan:0:2:1'})
    assert r.returncode == 3 and 'non-finite' in r.stderr and 'Traceback' not in r.stderr
    (run,) = list(tmp_path.iterdir())
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['status'] == 'failed' and 'non-finite' in cfg['error'] and cfg['failed_at_epoch'] == 2
    assert torch.load(run / 'last.pth', weights_only=True)['epoch'] == 1


def test_nan_policy_skip_counts_the_batch(data_args, tmp_path):
    r = agenb('train', *data_args, *TINY, '--no-report', '--nan-policy', 'skip', '--output-dir', tmp_path,
              env={'AGENB_FAULT': 'nan:0:2:1'})
    assert r.returncode == 0, r.stderr[-2000:]
    h = json.loads((_run_dir(r) / 'history.json').read_text())
    assert [e['skipped_batches'] for e in h] == [0, 1]


def test_truncated_checkpoint_and_bad_resume(tiny_run, tmp_path):
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run)
    data = (run / 'last.pth').read_bytes()
    (run / 'last.pth').write_bytes(data[: len(data) // 2])
    cfg = json.loads((run / 'config.json').read_text()); cfg['status'] = 'interrupted'
    (run / 'config.json').write_text(json.dumps(cfg))
    r = agenb('train', '--resume', run)
    assert r.returncode == 2 and 'truncated' in r.stderr and 'Traceback' not in r.stderr
    r = agenb('train', '--resume', tiny_run)  # a completed run has nothing left to do
    assert r.returncode == 2 and 'completed' in r.stderr


def test_unwritable_output_dir_fails_early(data_args, tmp_path):
    if os.geteuid() == 0:
        target = '/proc/agenb-runs'  # root can write anywhere on disk; /proc cannot be written by anyone
    else:
        ro = tmp_path / 'ro'; ro.mkdir(); ro.chmod(0o500); target = ro / 'runs'
    r = agenb('train', *data_args, *TINY, '--output-dir', target)
    assert r.returncode == 2 and '--output-dir' in r.stderr and 'Traceback' not in r.stderr


def test_checkpoint_of_another_architecture_or_size_is_refused(tiny_run, tmp_path):
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run)
    cfg = json.loads((run / 'config.json').read_text()); cfg['status'] = 'interrupted'; cfg['args']['epochs'] = 4
    (run / 'config.json').write_text(json.dumps(cfg))
    for key, value, needle in (('arch', 'resnet34', "arch='resnet18'"), ('image_size', 96, 'image_size=64')):
        bad = dict(cfg, args={**cfg['args'], key: value})          # a config.json that no longer fits its last.pth
        (run / 'config.json').write_text(json.dumps(bad))
        r = agenb('train', '--resume', run)
        assert r.returncode == 2 and needle in r.stderr and 'Traceback' not in r.stderr, r.stderr


def _xlsx_with_older_first_subject(src, dst, years=20):
    "A copy of the spreadsheet `src` at `dst` with the first subject's age raised by `years`."
    import openpyxl
    wb = openpyxl.load_workbook(src); ws = wb.active
    row, col = next((c.row, c.column) for r in ws.iter_rows(max_row=3) for c in r if str(c.value).strip().lower() == 'age')
    ws.cell(row + 1, col).value = float(ws.cell(row + 1, col).value) + years
    wb.save(dst)


def test_resume_refuses_another_setting_or_other_data(tiny_run, tmp_path, synth_root):
    """--resume continues the run as it started: a flag that changes what it trains (a new --seed re-split the
    subjects, and test images of the new split had been training images), or other data, is refused with one line
    before anything is written; the data may move, and workers may change."""
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run)
    cfg = json.loads((run / 'config.json').read_text()); cfg['status'] = 'interrupted'; cfg['args']['epochs'] = 3
    cfg['args'].update(momentum=0.95, view_pool='attention')   # recorded by an older agenb, unused by this run: no obstacle
    (run / 'config.json').write_text(json.dumps(cfg))
    files = lambda: {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    before = files()
    for flag, value in (('--seed', '7'), ('--lr', '0.5'), ('--loss', 'mse'), ('--epochs', '9')):
        r = agenb('train', '--resume', run, flag, value)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and f'{flag} ' in lines[0] and 'differs from the run' in lines[0], r.stderr
        assert files() == before
    moved = tmp_path / 'moved'; shutil.copytree(synth_root / 'TA', moved)
    edited = tmp_path / 'edited'; shutil.copytree(synth_root / 'TA', edited)
    _xlsx_with_older_first_subject(synth_root / 'TA' / 'characteristics.xlsx', edited / 'characteristics.xlsx')
    r = agenb('train', '--resume', run, '--image-dir', edited / 'Healthy' / 'Images', '--excel-path', edited / 'characteristics.xlsx')
    assert r.returncode == 2 and 'differ from those' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert files() == before
    r = agenb('train', '--resume', run, '--image-dir', moved / 'Healthy' / 'Images', '--excel-path', moved / 'characteristics.xlsx',
              '--num-workers', '0', '--no-report', '--gradcam-n', '0')
    assert r.returncode == 0, r.stderr[-2000:]
    after = json.loads((run / 'config.json').read_text())
    assert after['status'] == 'completed' and after['epochs_completed'] == 3
    assert after['dataset']['split_sha256'] == cfg['dataset']['split_sha256'] and after['data_fingerprint'] == cfg['data_fingerprint']


def test_config_reproduction_refuses_changed_data_unless_given(tiny_run, tmp_path, synth_root):
    """--config reproduces the recorded run: other data under the recorded paths are refused (one line, no run
    folder); naming the data on the command line says the change is meant."""
    edited = tmp_path / 'edited'; shutil.copytree(synth_root / 'TA', edited)
    cfg = json.loads((tiny_run / 'config.json').read_text())
    cfg['args'] = {**cfg['args'], 'image_dir': str(edited / 'Healthy' / 'Images'), 'excel_path': str(edited / 'characteristics.xlsx'),
                   'output_dir': str(tmp_path / 'runs')}
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
    _xlsx_with_older_first_subject(synth_root / 'TA' / 'characteristics.xlsx', edited / 'characteristics.xlsx')
    r = agenb('train', '--config', tmp_path / 'config.json')
    assert r.returncode == 2 and 'differ from those' in r.stderr and 'give --image-dir and --excel-path' in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / 'runs').exists()
