"""The pages a person opens, rendered in a real headless Chromium (the system browser, driven by Playwright; no browser
is downloaded): a run's report.html, an experiment's report.html and an age-gap page. For each: every <img> decodes,
no console error or uncaught script error, no request leaves the file (outside requests are blocked and named), and the
key numbers are on the rendered page. Skipped, with the reason, where no Chromium or Playwright is installed
(`make browser` installs Chromium with apt-get when it can)."""
import json, os, re, shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from conftest import agenb
from test_experiment import experiment, exp_dir_of, write_spec

BROWSERS = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')


def find_browser():
    "The Chromium/Chrome to drive: $AGENB_BROWSER, else the first of BROWSERS on PATH: (path, None) or (None, why not)."
    env = os.environ.get('AGENB_BROWSER')
    if env: return (env, None) if shutil.which(env) else (None, f'AGENB_BROWSER={env} is not an executable')
    for name in BROWSERS:
        if shutil.which(name): return shutil.which(name), None
    return None, f'no Chromium or Chrome on PATH ({", ".join(BROWSERS)}): run `make browser` as root, or set AGENB_BROWSER'


BROWSER, WHY_NOT = find_browser()
try: import playwright.sync_api                                      # noqa: F401
except ImportError: BROWSER, WHY_NOT = None, WHY_NOT or 'playwright is not installed (requirements.lock): run make install'
pytestmark = pytest.mark.skipif(BROWSER is None, reason=f'browser test skipped: {WHY_NOT}')

# Every image, once loading and decoding have been forced (lazy images too): its source, whether it finished, its width.
IMAGES_JS = '''async () => {
  const imgs = Array.from(document.images);
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return imgs.map(i => ({src: i.currentSrc.slice(0, 60), complete: i.complete, width: i.naturalWidth}));
}'''
# The cells of every table row, as rendered text.
ROWS_JS = "() => Array.from(document.querySelectorAll('tr')).map(r => Array.from(r.cells).map(c => c.innerText.trim()))"


@dataclass
class Rendered:
    "What a page did in the browser."
    url: str
    n_img_tags: int                                       # <img tags in the file's source
    images: list = field(default_factory=list)            # [{src, complete, width}] from the DOM
    console_errors: list = field(default_factory=list)
    page_errors: list = field(default_factory=list)       # uncaught exceptions
    outside_requests: list = field(default_factory=list)  # any request but the page itself (data: URLs make none)
    text: str = ''                                        # the body's rendered text
    rows: list = field(default_factory=list)              # table rows, as lists of cell texts

    def problems(self) -> list:
        "Everything that is wrong with the page, one line each (empty: the page is fine)."
        out = [f'image {i["src"]!r} not decoded (naturalWidth {i["width"]})' for i in self.images if not i['width']]
        if len(self.images) != self.n_img_tags:
            out.append(f'{self.n_img_tags} <img> tags in the file but {len(self.images)} images in the page')
        out += [f'console error: {m}' for m in self.console_errors]
        out += [f'uncaught error: {e}' for e in self.page_errors]
        out += [f'request leaving the file: {u}' for u in self.outside_requests]
        if not self.text.strip(): out.append('the page shows no text')
        return out

    def row(self, first):
        "The table rows whose first cells are `first`."
        return [r for r in self.rows if r[:len(first)] == list(first)]


@pytest.fixture(scope='module')
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        # Outside hosts resolve to nothing as a second wall; the route below blocks and records every request first.
        b = p.chromium.launch(executable_path=BROWSER, args=['--host-resolver-rules=MAP * ~NOTFOUND'])
        yield b
        b.close()


def render(browser, path) -> Rendered:
    "Open the file `path` in a fresh browser context and record what it did."
    path = Path(path).resolve()
    url = path.as_uri()
    r = Rendered(url, len(re.findall(r'<img\b', path.read_text(errors='replace'), re.I)))
    ctx = browser.new_context()
    try:
        def route(rt):
            if rt.request.url == url: rt.continue_()
            else: r.outside_requests.append(rt.request.url); rt.abort()
        ctx.route('**/*', route)
        page = ctx.new_page()
        page.set_default_timeout(60_000)
        page.on('console', lambda m: m.type == 'error' and r.console_errors.append(m.text))
        page.on('pageerror', lambda e: r.page_errors.append(f'{e.name}: {e.message}'))
        page.goto(url, wait_until='load')
        r.images = page.evaluate(IMAGES_JS)
        r.text, r.rows = page.inner_text('body'), page.evaluate(ROWS_JS)
    finally:
        ctx.close()
    return r


def test_checker_reports_broken_pages(browser, tmp_path):
    "The checks can fail: a bad image, a console.error, an uncaught error and outside requests are all reported."
    ok_png = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=='
    page = tmp_path / 'bad.html'
    page.write_text(f'<html><body><p>MAE 1.234</p><img src="data:image/png;base64,{ok_png}">'
                    '<img src="data:image/png;base64,bm90IGEgcG5n"><img src="http://example.com/x.png">'
                    '<link rel="stylesheet" href="https://cdn.example.org/style.css">'
                    '<script>console.error("boom"); throw new Error("kaput")</script></body></html>')
    r = render(browser, page)
    assert [i['width'] for i in r.images] == [1, 0, 0]
    p = r.problems()
    assert "image 'data:image/png;base64,bm90IGEgcG5n' not decoded (naturalWidth 0)" in p
    assert 'console error: boom' in p and 'uncaught error: Error: kaput' in p
    assert sorted(r.outside_requests) == ['http://example.com/x.png', 'https://cdn.example.org/style.css']
    assert 'request leaving the file: http://example.com/x.png' in p and 'MAE 1.234' in r.text
    good = tmp_path / 'good.html'
    good.write_text(f'<html><body><p>fine</p><img src="data:image/png;base64,{ok_png}"></body></html>')
    assert render(browser, good).problems() == []


def test_run_report(browser, tiny_run):
    "The trainer's report.html of the shared tiny run: its plots decode and it shows the test MAE of metrics.json."
    m = json.loads((tiny_run / 'metrics.json').read_text())
    r = render(browser, tiny_run / 'report.html')
    assert r.problems() == []
    assert len(r.images) >= 2                                           # curves and scatter at least
    assert f'Test MAE {m["overall"]["mae"]:.3f} years' in r.text
    assert r.row(['test, image level', str(m['n_images']), f'{m["overall"]["mae"]:.3f}'])
    assert '95% interval' in r.text and 'best_model.pth (epoch' in r.text          # its uncertainty and checkpoint


@pytest.fixture(scope='module')
def small_exp(tmp_path_factory, synth_root):
    """The smallest experiment with a report: 1 variant x 2 folds x 1 seed of 32 px, 1-epoch runs (cli engine; a second
    variant would add ~20 s of process starts and nothing the browser checks: tests/test_experiment.py ranks variants)."""
    d = tmp_path_factory.mktemp('browser_exp')
    spec = write_spec(d / 'spec.yaml', synth_root, grid={'loss': ['mae']}, folds=2, bootstrap=100)
    r = experiment('run', spec, '--out', d / 'exp', '--workers', '2', '--engine', 'cli')
    assert r.returncode == 0, r.stderr[-3000:]
    return exp_dir_of(r)


def test_experiment_report(browser, small_exp):
    "The experiment's report.html: figures decode, the leaderboard's rank 1 is leaderboard.csv's best with its MAE."
    board = pd.read_csv(small_exp / 'leaderboard.csv').sort_values('subject_mae')
    best = board.iloc[0]
    r = render(browser, small_exp / 'report.html')
    assert r.problems() == []
    assert len(r.images) >= 1 and 'Leaderboard' in r.text
    mae = f'{best.subject_mae:.2f} [{best.subject_mae_ci_low:.2f}, {best.subject_mae_ci_high:.2f}]'
    assert r.row(['1', best.variant, mae]), [x for x in r.rows if best.variant in x]


def test_agegap_page(browser, tiny_run, synth_root, tmp_path):
    "An age-gap page (the tiny run against the synthetic Pathological cohort): its 3 plots decode, its difference shows."
    out = tmp_path / 'agegap'
    g = agenb('agegap', tiny_run, '--image-dir', synth_root / 'TA' / 'Pathological' / 'Images', '--out', out,
              '--n-boot', '100', '--num-workers', '1', '--no-run-report')
    assert g.returncode == 0, g.stderr[-3000:]
    res = json.loads((out / 'agegap.json').read_text())
    (name, c), = res['comparisons'].items()
    k = c['corrected'] or c['raw']
    r = render(browser, out / 'agegap.html')
    assert r.problems() == []
    assert len(r.images) == 3 and f'Age gap: {tiny_run.name}' in r.text
    diff = f'{k["difference"]:.2f} [{k["difference_ci"][0]:.2f}, {k["difference_ci"][1]:.2f}]'
    row = r.row([name, str(k['n_clinical']), str(k['n_healthy'])])
    assert row and diff in row[0], (diff, row)
