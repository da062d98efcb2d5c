"""Execute chapters in place so they keep their small, deterministic outputs (figures, tables) for a reader:
`make outputs [NBS="nbs/06_images.ipynb ..."]`. Cells flagged with settings.ini's tst_flags (slow, gpu) and
`#| eval: false` cells are skipped, as nbdev_test skips them; nbdev_clean then strips execution metadata."""
import sys
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from nbdev.config import get_config

FLAGS = get_config().get('tst_flags', '').split()


def skipped(cell):
    first = [l.strip() for l in cell.source.splitlines()[:3]]
    return any(l in ('#| eval: false', '#|eval: false') or any(l == f'#| {f}' for f in FLAGS) for l in first)


def execute(path):
    nb = read_nb(path)
    shell = CaptureShell(path=Path(path).parent)
    for cell in nb.cells:
        if cell.cell_type != 'code': continue
        if skipped(cell) or 'nbdev_export' in cell.source: cell.outputs = []; continue
        shell.cell(cell)
        if shell.exc: raise RuntimeError(f'{path}: cell failed: {shell.exc!r}\n{cell.source[:300]}')
        cell.outputs = [o for o in cell.outputs if not (o.get('output_type') == 'stream' and o.get('name') == 'stderr')]
    write_nb(nb, path)


if __name__ == '__main__':
    for p in sys.argv[1:]: execute(p); print('executed', p)
