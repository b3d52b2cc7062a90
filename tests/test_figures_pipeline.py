"""``make figures`` in miniature: every figure of the appendix from nothing but the repository.

The whole pipeline runs through the Makefile at ``SCALE=tiny`` (a ResNet8 with 4-8 channels trained for
3 K-FAC steps, a 16-wide Transformer for 2, the NQM on 1,000 dimensions in 20 bins) into a temporary
folder; then every figure must exist as a real PNG, ``summary.json`` must hold the measured numbers of
each, and ``index.html`` must show every image — checked by loading them in headless Chromium when it
is installed (``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

REPO = Path(__file__).resolve().parents[1]
FIGURES = ["fig09", "fig10a", "fig10b", "fig11", "fig12", "fig13", "fig14a", "fig14b", "fig14c", "fig15",
           "sweep_mlp", "kfac_vs_ggn_resnet8", "kfac_vs_ggn_transformer"]


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("figures") / "figs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), "figures", "SCALE=tiny", f"FIG={out}"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_every_figure_is_a_real_png(figures):
    for name in FIGURES:
        image = matplotlib.image.imread(figures / f"{name}.png")
        assert image.ndim == 3 and min(image.shape[:2]) > 200, name
        assert image.std() > 0.02, f"{name} is blank"


def test_summary_holds_measured_numbers(figures):
    summary = json.loads((figures / "summary.json").read_text())
    assert summary["scale"] == "tiny"
    for name in FIGURES:
        entry = summary["figures"][name]
        assert entry["produced"] is True, name
        assert entry["claim"] and entry["criterion"] and entry["why"], name
        assert entry["verdict"] in ("held", "did not hold", "not judged"), name
        assert entry["verdict"] == {True: "held", False: "did not hold", None: "not judged"}[entry["held"]]
    assert summary["figures"]["fig10a"]["measured"]["Spearman"] is not None
    assert summary["figures"]["fig12"]["measured"]["exponent ŝ"] > 0
    assert any(k.startswith("critical batch size") for k in summary["figures"]["fig13"]["measured"])
    runs = summary["introduction"]["runs"]
    assert runs["resnet8"]["augment"] == ["crop"] and runs["resnet8"]["steps"] == 3
    assert summary["introduction"]["wall time of each part (s)"]


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _images(figures: Path) -> list[str]:
    summary = json.loads((figures / "summary.json").read_text())
    return [img for entry in summary["figures"].values() for img in entry["images"]]


def test_index_references_every_figure(figures):
    parser = _Images()
    page = (figures / "index.html").read_text()
    parser.feed(page)
    assert sorted(parser.sources) == sorted(_images(figures))
    assert set(f"{name}.png" for name in FIGURES) <= set(parser.sources)
    assert "<h2>Verdicts</h2>" in page  # the summary table opens the page
    for verdict in ("held", "did not hold", "not judged"):
        page = page.replace(verdict, "")
    assert '{"' not in page  # no raw JSON on the page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_index_images_load_in_headless_chromium(figures, tmp_path):
    """Every image of index.html decodes in the browser (naturalWidth > 0 once the page has loaded)."""
    parser = _Images()
    parser.feed((figures / "index.html").read_text())
    probe = figures / "_probe.html"
    images = "".join(f'<img src="{src}">' for src in parser.sources)
    probe.write_text(
        "<!doctype html><html><body>" + images + "<pre id='out'></pre><script>"
        "window.onload = () => { document.getElementById('out').textContent = JSON.stringify("
        "[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])); };"
        "</script></body></html>"
    )
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--allow-file-access-from-files",
    ]
    run = subprocess.run(
        [_chromium(), *flags, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    start = run.stdout.index('<pre id="out">') + len('<pre id="out">')
    loaded = json.loads(run.stdout[start : run.stdout.index("</pre>", start)])
    assert len(loaded) == len(_images(figures))
    for src, complete, width in loaded:
        assert complete and width > 200, src
    shot = tmp_path / "index.png"
    subprocess.run(
        [
            _chromium(),
            *flags,
            f"--screenshot={shot}",
            "--window-size=1200,3000",
            (figures / "index.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert matplotlib.image.imread(shot).std() > 0.02
