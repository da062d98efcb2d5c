"""A full disk while a run or a bundle is written: one line naming the file, exit 2, the run recorded as failed, no
temporary file left. Checked on small tmpfs mounts (root with CAP_SYS_ADMIN; skipped elsewhere)."""
import contextlib, json, subprocess
from pathlib import Path

import pytest

from conftest import TINY, agenb


@contextlib.contextmanager
def tmpfs(path, size):
    path.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True, text=True)
    if r.returncode: pytest.skip(f'cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})')
    try: yield path
    finally: subprocess.run(['umount', str(path)], check=True)


def test_training_into_a_full_disk_records_failed_and_names_the_file(tmp_path, data_args):
    # 60 MB: the best model (45 MB) fits, last.pth (weights and optimizer state) does not. torch's own file writer kept
    # the half-written file open, so even the "failed" status could not be written and the run stayed "running".
    with tmpfs(tmp_path / 'disk', '60m') as disk:
        r = agenb('train', *data_args, *TINY, '--image-size', '32', '--epochs', '1', '--no-report', '--gradcam-n', '0',
                  '--output-dir', disk, proc=True)
        lines = [l for l in r.stderr.strip().splitlines() if 'agenb: error' in l]
        assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
        assert len(lines) == 1 and 'No space left on device' in lines[0] and 'last.pth' in lines[0], r.stderr[-2000:]
        run, = disk.glob('run_*')
        cfg = json.loads((run / 'config.json').read_text())
        assert cfg['status'] == 'failed' and 'last.pth' in cfg['error']
        assert not list(run.glob('.*.tmp')) and not (run / 'last.pth').exists()


def test_export_into_a_full_disk_is_one_line(tmp_path, tiny_run):
    # torch.jit.save to a file aborted the whole process (exit 134, a C++ stack on stderr) and left its temporary file
    with tmpfs(tmp_path / 'disk', '1m') as disk:
        r = agenb('export', tiny_run, '--out', disk / 'bundle', '--format', 'torchscript', proc=True)
        assert r.returncode == 2 and r.stderr.strip().count('\n') == 0, r.stderr[-2000:]
        assert 'No space left on device' in r.stderr and 'model.torchscript.pt' in r.stderr
        assert not [p for p in disk.rglob('*') if p.is_file()]
