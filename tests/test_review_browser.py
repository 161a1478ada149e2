"""The review page in a real browser (Debian's headless Chromium driven by Playwright): play a pair, label pairs
by keys and clicks, reload, export; --serve writes labels.json; `pairs --labels` applies what was labelled."""

import hashlib
import json
import re
import shutil
import threading

import pytest

from tests.datasets import write_toy_eval_report, write_toy_scores
from videotuna_dpo.cli import main
from videotuna_dpo.pipeline.pairs import build_pairs_dataset
from videotuna_dpo.review.page import write_page
from videotuna_dpo.review.server import ReviewServer

CAPTIONS = ["a red square moving right", "a blue circle moving up", "a green square moving left"]
CHROMIUM = next(filter(None, (shutil.which(name) for name in ("chromium", "chromium-browser"))), None)

if CHROMIUM is None:
    pytest.skip("no Chromium on this machine: the review page's browser test needs Debian's `chromium` "
                "(apt-get install chromium; .ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        # Root (CI) cannot use Chromium's sandbox; the page is our own, local and offline.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--mute-audio"])
        yield b
        b.close()


@pytest.fixture
def dataset(tmp_path):
    """3 captions x 3 toy samples, every pair above the gap: rows 0-2 are caption 0's, rows 3-5 caption 1's.

    The videos are lossless RGB H.264, as the demo writes them: the page plays their previews."""
    scores = write_toy_scores(tmp_path, CAPTIONS, lossless=True)
    build_pairs_dataset(scores, tmp_path / "ds", strategy="all-gap", plots=False)
    return tmp_path, scores


def _videos(page):
    return page.evaluate("""() => ['video-a', 'video-b'].map((id) => {
        const v = document.getElementById(id);
        return {paused: v.paused, t: v.currentTime, duration: v.duration, src: v.currentSrc};
    })""")


def _label(page, key):
    page.keyboard.press(key)


def _label_four_pairs(page):
    """Row 0 flip (key), row 1 keep (click), row 2 tie (key), row 3 reject its winner (click); the page advances."""
    _label(page, "2")
    page.click("#label-buttons button[data-label=keep]")
    _label(page, "3")
    page.click("#label-buttons button[data-label=reject-winner]")


def _labels(page):
    return [(e["winner"]["path"].rsplit("/", 1)[1], e["loser"]["path"].rsplit("/", 1)[1], e["label"], e.get("broken"))
            for e in page.evaluate("window.videotunaReview.labels()")]


EXPECTED = [("p0_s0.mp4", "p0_s1.mp4", "flip", None), ("p0_s0.mp4", "p0_s2.mp4", "keep", None),
            ("p0_s1.mp4", "p0_s2.mp4", "tie", None), ("p1_s0.mp4", "p1_s1.mp4", "reject", ["winner"])]


def _check_applied(tmp_path, scores, labels, capsys):
    """`videotuna pairs --labels`: row 0 flipped, row 1 confirmed, row 2 dropped (tie), rows 3 and 4 dropped (p1_s0)."""
    out = tmp_path / "relabelled"
    assert main(["pairs", "--scores", str(scores), "--out", str(out), "--strategy", "all-gap", "--labels", str(labels)]) == 0
    assert "1 pair(s) confirmed, 1 flipped, 1 dropped as ties, 2 dropped with 1 rejected video(s)" in capsys.readouterr().out
    manifest = json.loads((out / "pairs" / "manifest.json").read_text())
    name = [v["path"].rsplit("/", 1)[1] for v in manifest["videos"]]
    assert [(name[p["winner"]], name[p["loser"]], p["origin"]) for p in manifest["pairs"]] == [
        ("p0_s1.mp4", "p0_s0.mp4", "human-flipped"), ("p0_s0.mp4", "p0_s2.mp4", "human-confirmed"),
        ("p1_s1.mp4", "p1_s2.mp4", "scorer"), ("p2_s0.mp4", "p2_s1.mp4", "scorer"), ("p2_s0.mp4", "p2_s2.mp4", "scorer"),
        ("p2_s1.mp4", "p2_s2.mp4", "scorer")]


def test_the_page_plays_both_videos_in_sync_and_keeps_labels_over_a_reload(browser, dataset, capsys):
    tmp_path, scores = dataset
    write_page(tmp_path / "ds", tmp_path / "review")
    context = browser.new_context(viewport={"width": 1366, "height": 768}, accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto((tmp_path / "review" / "index.html").as_uri())

    # The shown pair plays on open, both videos from disk; space pauses both at the same frame.
    page.wait_for_function("""() => ['video-a', 'video-b'].every((id) => {
        const v = document.getElementById(id); return !v.paused && v.currentTime > 0.3; })""", timeout=15000)
    a, b = _videos(page)
    for video, name in ((a, "p0_s0.mp4"), (b, "p0_s1.mp4")):
        sha = hashlib.sha256((tmp_path / "samples" / name).read_bytes()).hexdigest()
        assert video["src"] == (tmp_path / "review" / "videos" / f"{sha[:24]}.mp4").as_uri()
    assert a["duration"] == pytest.approx(2.0, abs=0.01) and b["duration"] == pytest.approx(2.0, abs=0.01)
    page.keyboard.press(" ")
    a, b = _videos(page)
    assert a["paused"] and b["paused"] and abs(a["t"] - b["t"]) < 0.01
    # scrubbing moves both
    page.eval_on_selector("#scrub", "(s) => { s.value = '250'; s.dispatchEvent(new Event('input')); }")
    page.wait_for_function("""() => ['video-a', 'video-b'].every((id) =>
        Math.abs(document.getElementById(id).currentTime - 0.5) < 0.01)""", timeout=5000)
    # only the shown pair's videos are loaded: the list's other pairs have no <video>
    assert page.locator("video").count() == 2

    _label_four_pairs(page)
    assert _labels(page) == EXPECTED
    assert page.text_content("#counter") == "reviewed 4 / 9"
    assert page.evaluate("window.videotunaReview.current()") == 4  # advanced past the labelled pairs

    page.reload()
    page.wait_for_selector("#list .row")
    assert _labels(page) == EXPECTED
    assert page.text_content("#counter") == "reviewed 4 / 9"
    assert page.locator("#list .row[data-row='0'] .badge.flip").count() == 1
    # filters: by label state, by prompt, by a value range; sort by a dimension's gap
    page.select_option("#filter-state", "flip")
    assert page.evaluate("window.videotunaReview.view()") == [0]
    page.select_option("#filter-state", "unlabelled")
    assert page.evaluate("window.videotunaReview.view()") == [4, 5, 6, 7, 8]
    page.select_option("#filter-state", "all")
    page.fill("#filter-prompt", "blue")
    assert page.evaluate("window.videotunaReview.view()") == [3, 4, 5]
    page.fill("#filter-prompt", "")
    page.select_option("#filter-field", "gap")
    page.fill("#filter-min", "0.3")
    assert page.evaluate("window.videotunaReview.view()") == [1, 4, 7]  # clean vs flicker: gap 0.35
    page.fill("#filter-min", "")
    page.select_option("#sort-field", "gap:normalized/dynamic_degree")
    assert page.evaluate("window.videotunaReview.view()")[:3] == [2, 5, 8]  # static winner: dynamic degree gap -1

    # the overview counts the labels: of two decided pairs the scorer was overruled once
    page.focus("#filter-min")
    page.keyboard.press("Escape")  # leaves the input: keys are the page's again
    page.keyboard.press("o")
    assert "Of 2 pairs where a person picked a better video, the scorer picked the same in 1 and the other in 1 " \
           "(50% overruled)." in page.text_content("#agreement")
    dims = {row.split("\t")[0]: row.split("\t")[1:] for row in page.eval_on_selector_all(
        "#dimension-agreement tr", "(rows) => rows.map((r) => [...r.cells].map((c) => c.textContent).join('\\t'))")}
    assert dims["temporal_flickering"][:2] == ["1", "100%"]  # only the kept pair differs on it, and the person agreed
    assert dims["dynamic_degree"][:2] == ["1", "0%"]  # the flipped pair: the scorer's pick moved, the person chose static

    with page.expect_download() as download:
        page.click("#export")
    exported = tmp_path / "labels.json"
    download.value.save_as(exported)
    doc = json.loads(exported.read_text())
    assert (doc["format"], doc["kind"], len(doc["labels"])) == ("videotuna-review-labels", "pairs", 4)
    assert errors == []
    context.close()
    _check_applied(tmp_path, scores, exported, capsys)


def test_the_served_page_writes_every_label_to_labels_json(browser, dataset, capsys):
    tmp_path, scores = dataset
    out = tmp_path / "review"
    page_files = write_page(tmp_path / "ds", out)
    server = ReviewServer(out, page_files, out / "labels.json", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(server.url)
        page.wait_for_function("document.getElementById('video-a').currentTime > 0", timeout=15000)
        assert _videos(page)[0]["src"] == server.url + "video/0"
        # the page shows the video's true colours: the toy world's background is (24, 24, 32)
        page.keyboard.press(" ")
        corner = page.evaluate("""() => {
            const v = document.getElementById('video-a'), c = document.createElement('canvas');
            c.width = v.videoWidth; c.height = v.videoHeight;
            const g = c.getContext('2d'); g.drawImage(v, 0, 0);
            return Array.from(g.getImageData(4, 4, 1, 1).data.slice(0, 3)); }""")
        assert max(abs(x - y) for x, y in zip(corner, (24, 24, 32))) <= 6, corner
        _label_four_pairs(page)
        page.evaluate("window.videotunaReview.idle()")
        written = json.loads((out / "labels.json").read_text())
        assert [(e["winner"]["path"].rsplit("/", 1)[1], e["loser"]["path"].rsplit("/", 1)[1], e["label"],
                 e.get("broken")) for e in written["labels"]] == EXPECTED
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in written["labels"])
        assert "saved to " + str(out / "labels.json") in page.text_content("#save-state")
        # a fresh browser (no local storage) gets the labels from the server
        context.close()
        context = browser.new_context()
        page = context.new_page()
        page.goto(server.url)
        page.wait_for_selector("#list .row")
        page.wait_for_function("window.videotunaReview.labels().length === 4", timeout=5000)
        assert _labels(page) == EXPECTED
        context.close()
    finally:
        server.shutdown()
        server.server_close()
    _check_applied(tmp_path, scores, out / "labels.json", capsys)


def test_an_eval_report_page_gives_the_human_win_rate_next_to_the_scorers(browser, tmp_path):
    report = write_toy_eval_report(tmp_path / "report", CAPTIONS)
    write_page(report, tmp_path / "review")
    context = browser.new_context()
    page = context.new_page()
    page.goto((tmp_path / "review" / "index.html").as_uri())
    page.wait_for_function("document.getElementById('video-b').currentTime > 0", timeout=15000)
    assert page.text_content("#role-a").startswith("base") and page.text_content("#role-b").startswith("tuned (run)")
    # pair 0: tuned better (the scorer agrees), pair 1: tuned better (the scorer preferred the base), pair 2: tie
    page.keyboard.press("2")
    page.click("#label-buttons button[data-label=tuned]")
    page.keyboard.press("3")
    assert [e["label"] for e in page.evaluate("window.videotunaReview.labels()")] == ["tuned", "tuned", "tie"]
    page.keyboard.press("o")
    cells = page.eval_on_selector_all("#win-rates tr:nth-child(2) td", "(cells) => cells.map((c) => c.textContent)")
    # people: (1 + 1 + 0.5) / 3; the scorer on the same pairs: (1 + 0 + 1) / 3, and on all pairs of the report 2 / 3
    assert cells == ["run", "3", "83%", "67%", "67%"]
    assert "the scorer picked the same in 1 and the other in 1 (50% overruled)" in page.text_content("#agreement")
    context.close()
