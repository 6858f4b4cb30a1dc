"""Lecture decks: every deck builds to self-contained HTML, and renders in headless Chromium.

The render check drives Debian's ``chromium`` over the DevTools protocol on a pipe (no extra
Python package): it loads each built deck from a file, counts reveal.js's slides, checks that
every image loaded and that nothing was fetched from the network, and keeps a screenshot of
the title slide in ``build/slides-artifacts/``. Without Chromium that test is skipped, saying so.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import random
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import nbformat
import pytest

from minidisagg.course import deck_figures, slides

REPO = Path(__file__).resolve().parents[1]
SLIDES_DIR = REPO / "slides"
ARTIFACTS = REPO / "build" / "slides-artifacts"
DECKS = sorted(SLIDES_DIR.glob("[0-9][0-9]_*.ipynb"))
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def slide_type(cell) -> str:
    """A cell's reveal.js role ('-' when unset)."""
    return cell.metadata.get("slideshow", {}).get("slide_type", "-")


def expected_slide_count(nb) -> int:
    """Slides a deck should have: the first shown cell opens one, and so does every later slide/subslide cell."""
    shown = [slide_type(c) for c in nb.cells if slide_type(c) not in ("skip", "notes")]
    return 1 + sum(t in ("slide", "subslide") for t in shown[1:]) if shown else 0


def slides_of(nb) -> list[list]:
    """A deck's cells grouped by slide (notes and skipped cells stay with the slide they follow)."""
    groups: list[list] = []
    for cell in nb.cells:
        if not groups or slide_type(cell) in ("slide", "subslide"):
            groups.append([])
        groups[-1].append(cell)
    return groups


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Every deck built once (deck stem -> HTML page)."""
    out = tmp_path_factory.mktemp("slides")
    assert slides.main(["--out", str(out)]) == 0
    return {p.stem: p for p in out.glob("[0-9][0-9]_*.html")}


# ---------------------------------------------------------------- the decks as notebooks


def test_there_is_an_overview_and_one_deck_per_lab():
    assert [p.name[:2] for p in DECKS] == ["00", "01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("deck", DECKS, ids=lambda p: p.stem)
def test_deck_shape(deck):
    """10-20 slides; every content slide has speaker notes; committed executed, with a figure."""
    nb = nbformat.read(str(deck), as_version=4)
    groups = slides_of(nb)
    assert 10 <= len(groups) <= 20, f"{deck.name}: {len(groups)} slides"
    assert expected_slide_count(nb) == len(groups)
    for i, group in enumerate(groups[1:], start=2):  # the title slide needs none
        assert any(slide_type(c) == "notes" for c in group), f"{deck.name}: slide {i} has no speaker notes"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), f"{deck.name}: not executed"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{deck.name}: a cell raised {errors[0].ename}"
    pngs = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert pngs, f"{deck.name}: no figure"


# ---------------------------------------------------------------- the build


def test_every_deck_builds_self_contained(built):
    assert sorted(built) == [p.stem for p in DECKS]
    for stem, page in built.items():
        text = page.read_text(encoding="utf-8")
        nb = nbformat.read(str(SLIDES_DIR / f"{stem}.ipynb"), as_version=4)
        remote = re.findall(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="(?:https?:)?//[^"]*"', text)
        assert not remote, f"{stem} loads {remote[:2]}"
        assert "Reveal.initialize" in text and "RevealNotes" in text
        assert text.count('<aside class="notes">') >= expected_slide_count(nb) - 1
        assert 'src="data:image/png;base64,' in text


def test_build_rejects_an_unknown_deck_and_a_missing_reveal(tmp_path, monkeypatch, capsys):
    assert slides.main(["--out", str(tmp_path), "99_nope"]) == 2
    assert "no deck matches" in capsys.readouterr().err
    monkeypatch.setenv(slides.REVEAL_DIR_ENV, str(tmp_path / "no-reveal-here"))
    assert slides.main(["--out", str(tmp_path), "00"]) == 2
    assert "reveal.js not found" in capsys.readouterr().err


def test_inline_reveal_refuses_a_page_without_its_markers():
    assets = slides.find_reveal()
    with pytest.raises(slides.SlidesError, match="expected 1"):
        slides.inline_reveal("<html><body>no reveal here</body></html>", assets)


# ---------------------------------------------------------------- GPU results, present or not


def fake_gpu_run(path: Path, rng: random.Random) -> dict:
    """A GPU benchmark file in the format ``minidisagg bench gpu`` writes, with random numbers."""
    rows = []
    for name in ("decode GEMV", "prefill GEMM", "paged decode attention"):
        limit = rng.uniform(100, 4000)
        value = limit * rng.uniform(0.1, 0.95)
        rows.append({"name": name, "value": value, "unit": "GB/s", "limit": limit, "fraction_of_limit": value / limit,
                     "hf_value": value / 2, "speedup_vs_hf": 2.0})
    run = {"card": f"NVIDIA Test-{rng.randrange(100, 999)}", "torch": "2.13.0", "copy_GBps": rng.uniform(1000, 4000),
           "mm_TFLOPs": rng.uniform(100, 900), "rows": rows}
    path.write_text(json.dumps(run))
    return run


def test_gpu_results_are_plotted_when_present_and_named_when_absent(tmp_path):
    assert deck_figures.latest_gpu_run(tmp_path) is None
    assert deck_figures.gpu_status(tmp_path) == "no GPU run recorded"
    rng = random.Random()
    run = fake_gpu_run(tmp_path / "gpu-h100-2026-01-01.json", rng)
    loaded = deck_figures.latest_gpu_run(tmp_path)
    assert loaded is not None and loaded["card"] == run["card"]
    assert run["card"] in deck_figures.gpu_status(tmp_path)
    fig = deck_figures.gpu_fraction_figure(loaded)
    bars = [b for ax in fig.axes for b in ax.patches]  # kernels and whole-model rows, one panel each
    assert sorted(round(b.get_width(), 6) for b in bars) == sorted(round(r["fraction_of_limit"], 6) for r in run["rows"])
    assert run["card"] in fig._suptitle.get_text()
    width_px, height_px = fig.get_size_inches() * fig.dpi * 80 / fig.dpi
    assert width_px <= 960 and height_px <= 700  # fits a reveal.js slide at the decks' 80 dpi
    ceilings = deck_figures.gpu_ceilings(loaded)
    assert ceilings.copy_bytes_per_s == pytest.approx(run["copy_GBps"] * 1e9)
    assert ceilings.matmul_flops_per_s == pytest.approx(run["mm_TFLOPs"] * 1e12)



def test_latest_result_is_the_newest_recorded_run_whatever_its_name(tmp_path):
    rng = random.Random()
    days = sorted(rng.sample(range(1, 28), 4))
    runs = {  # name -> recorded date; a same-day "-run1" suffix and the card must not decide the order
        f"disagg-h200-2026-03-{days[0]:02d}.json": f"2026-03-{days[0]:02d}T23:00:00",
        f"disagg-h100-2026-03-{days[1]:02d}-run1.json": f"2026-03-{days[1]:02d}T01:00:00",
        f"disagg-h100-2026-03-{days[1]:02d}.json": f"2026-03-{days[1]:02d}T02:00:00",
        f"disagg-a100-2026-03-{days[2]:02d}-run1.json": f"2026-03-{days[2]:02d}T05:00:00",
    }
    for name, date in runs.items():
        (tmp_path / name).write_text(json.dumps({"date": date, "tag": name}))
    (tmp_path / f"disagg-h100-2026-03-{days[3]:02d}.json").write_text(json.dumps({"tag": "undated"}))
    assert deck_figures.latest_result("disagg", tmp_path)["_file"] == f"disagg-h100-2026-03-{days[3]:02d}.json"
    (tmp_path / f"disagg-h100-2026-03-{days[3]:02d}.json").unlink()
    latest = deck_figures.latest_result("disagg", tmp_path)
    assert latest["_file"] == latest["tag"] == f"disagg-a100-2026-03-{days[2]:02d}-run1.json"
    assert deck_figures.latest_result("gpu", tmp_path) is None

# ---------------------------------------------------------------- headless render


class DevToolsPipe:
    """A Chromium started with ``--remote-debugging-pipe``: JSON commands in on fd 3, replies out on fd 4."""

    def __init__(self, binary: str, profile_dir: Path) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # move the child's ends above fd 4 first, so placing them on 3 and 4 cannot clobber one another
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child_r, from_child_w)]
        for fd in (to_child_r, from_child_w):
            os.close(fd)

        def place_fds() -> None:
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--no-default-browser-check",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile_dir}",
                "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=place_fds,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for fd in high:
            os.close(fd)
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None else ""
                    raise RuntimeError(f"Chromium closed the DevTools pipe. {err}")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout_s: float = 60) -> dict:
        """Send one command and wait for its reply; events that arrive meanwhile are kept in ``events``."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout_s: float = 60) -> dict:
        """Wait for an event of ``method`` on ``session`` (kept ones first)."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            self.events.append(self._read_message(deadline))

    def close(self) -> None:
        """Ask Chromium to quit, then make sure it has."""
        try:
            self.call("Browser.close", timeout_s=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            os.close(fd)


# Waits for reveal.js, then for every image to finish loading, and reports what the page shows.
REPORT_JS = """
new Promise((resolve) => {
  const t0 = Date.now();
  const ready = () => window.Reveal && Reveal.isReady && Reveal.isReady();
  const poll = () => {
    if (!ready()) { return Date.now() - t0 > 20000 ? resolve({ready: false}) : setTimeout(poll, 50); }
    const imgs = Array.from(document.querySelectorAll('.reveal img'));
    Promise.all(imgs.map((i) => i.decode().catch(() => null))).then(() => resolve({
      ready: true,
      slides: Reveal.getTotalSlides(),
      images: imgs.length,
      broken: imgs.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => (i.src || '').slice(0, 80)),
      title: (document.querySelector('.reveal .slides section h1') || {}).textContent || '',
    }));
  };
  poll();
})
"""


def find_chromium() -> str | None:
    """Path of a Chromium-family browser, or None."""
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def render(browser: DevToolsPipe, page: Path, screenshot: Path) -> tuple[dict, list[dict]]:
    """Load one deck in a fresh tab: its report, and the network events of that tab."""
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Network", "Runtime"):
        browser.call(f"{domain}.enable", session=session)
    browser.call("Emulation.setDeviceMetricsOverride",
                 {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}, session=session)
    first_event = len(browser.events)
    browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
    browser.wait_event("Page.loadEventFired", session)
    result = browser.call("Runtime.evaluate", {"expression": REPORT_JS, "awaitPromise": True, "returnByValue": True},
                          session=session)
    report = result.get("result", {}).get("value") or {"ready": False, "exception": result.get("exceptionDetails")}
    shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    browser.call("Target.closeTarget", {"targetId": target})
    events = [e for e in browser.events[first_event:] if e.get("sessionId") == session]
    return report, events


def test_decks_render_in_headless_chromium(built):
    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium not found (.ci/run installs Debian's `chromium`; apt-get was unavailable or failed): "
                    "the headless render check did NOT run")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="minidisagg-chromium-") as profile:
        browser = DevToolsPipe(binary, Path(profile))
        try:
            for stem, page in sorted(built.items()):
                nb = nbformat.read(str(SLIDES_DIR / f"{stem}.ipynb"), as_version=4)
                shot = ARTIFACTS / f"{stem}-title.png"
                report, events = render(browser, page, shot)
                assert report.get("ready"), f"{stem}: reveal.js did not start ({report})"
                assert report["slides"] == expected_slide_count(nb), f"{stem}: {report['slides']} slides rendered"
                assert report["images"] >= 1 and not report["broken"], f"{stem}: images failed: {report['broken']}"
                failed = [e["params"].get("errorText") for e in events if e["method"] == "Network.loadingFailed"]
                assert not failed, f"{stem}: a resource failed to load: {failed}"
                fetched = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
                remote = [u for u in fetched if not u.startswith(("file:", "data:", "about:", "blob:"))]
                assert not remote, f"{stem} fetched from the network: {remote[:3]}"
                thrown = [e["params"]["exceptionDetails"].get("text") for e in events
                          if e["method"] == "Runtime.exceptionThrown"]
                assert not thrown, f"{stem}: JavaScript error: {thrown}"
                assert report["title"].strip().rstrip("¶").strip() == slides.deck_title(SLIDES_DIR / f"{stem}.ipynb")
                data = shot.read_bytes()
                assert data.startswith(PNG_MAGIC) and len(data) > 10_000, f"{stem}: empty screenshot"
        finally:
            browser.close()


def test_the_newest_gpu_course_report_is_read_with_its_claims_by_notebook(tmp_path):
    assert deck_figures.gpu_course_run(tmp_path) is None
    for date, card in (("2026-01-02", "NVIDIA B"), ("2025-12-30", "NVIDIA A")):
        (tmp_path / f"course-gpu-x-{date}.md").write_text(
            f"# course verify on {card} (x)\n\n| table |\n\n## Claims\n\n### solutions/03_interference.ipynb\n\n"
            f"- CLAIM ok: one [1]\n- CLAIM NOT SEEN: two [2]\n\n### slides/00_overview.ipynb\n\n- CLAIM ok: three\n")
    run = deck_figures.gpu_course_run(tmp_path)
    assert run["card"] == "NVIDIA B" and run["file"] == "course-gpu-x-2026-01-02.md"
    assert run["claims"]["solutions/03_interference.ipynb"] == ["CLAIM ok: one [1]", "CLAIM NOT SEEN: two [2]"]
    assert run["claims"]["slides/00_overview.ipynb"] == ["CLAIM ok: three"]
