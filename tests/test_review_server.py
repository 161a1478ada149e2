"""`videotuna review` without a browser: the page's data, its offline files, and what the server serves and refuses."""

import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.datasets import write_toy_eval_report, write_toy_scores
from videotuna_dpo.cli import main
from videotuna_dpo.errors import UserError
from videotuna_dpo.pipeline.pairs import build_pairs_dataset
from videotuna_dpo.review.page import write_page
from videotuna_dpo.review.server import ReviewServer

CAPTIONS = ["a red square moving right", "a blue circle moving up"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    scores = write_toy_scores(root, CAPTIONS)
    build_pairs_dataset(scores, root / "ds", strategy="all-gap")
    return root


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_the_page_holds_every_pair_with_its_scores_and_each_video_by_relative_path_and_hash(dataset, tmp_path):
    out = tmp_path / "review"
    page = write_page(dataset / "ds", out)
    data = page["data"]
    assert (page["kind"], page["pairs"], page["videos"]) == ("pairs", 6, 6)
    manifest = json.loads((dataset / "ds" / "pairs" / "manifest.json").read_text())
    assert [(data["videos"][p["a"]]["path"], data["videos"][p["b"]]["path"], p["gap"], p["weight"], p["probability"])
            for p in data["pairs"]] == [(manifest["videos"][m["winner"]]["path"], manifest["videos"][m["loser"]]["path"],
                                         m["gap"], m["weight"], m["probability"]) for m in manifest["pairs"]]
    first = data["videos"][0]
    assert first["path"] == str(dataset / "samples" / "p0_s0.mp4")
    assert first["sha256"] == _sha(first["path"])
    assert first["src"] == os.path.relpath(first["path"], out) and first["src"].startswith("../")  # opens from disk
    assert (out / first["src"]).resolve() == Path(first["path"])
    assert first["values"]["normalized/dynamic_degree"] == 1.0 and first["values"]["omniscore"] == 0.9
    assert data["dimensions"][:3] == ["omniscore", "quality", "semantic"]
    assert [p["title"] for p in data["plots"]] == ["OmniScore of the dataset's videos", "OmniScore gap of pairs",
                                                   "Pair weights", "Correlation of normalised dimensions"]
    for plot in data["plots"]:
        assert (out / plot["src"]).read_bytes()[:4] == b"\x89PNG"
    assert (out / "review-data.js").read_text().startswith("window.REVIEW = {")


def test_the_page_loads_nothing_from_a_network(dataset, tmp_path):
    out = tmp_path / "review"
    write_page(dataset / "ds", out)
    for name in ("index.html", "review.js", "review.css"):
        text = (out / name).read_text()
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), name
        assert not re.search(r"url\(|@import|fetch\(['\"]https?:", text), name
    html = (out / "index.html").read_text()
    assert '<script src="review-data.js"></script>' in html and '<script src="review.js"></script>' in html


def test_videos_a_browser_shows_wrongly_get_a_true_colour_preview_and_labels_name_the_originals(tmp_path, monkeypatch):
    from videotuna_dpo.data.video_io import read_video
    from videotuna_dpo.review.page import preview_reason

    scores = write_toy_scores(tmp_path, CAPTIONS[:1], lossless=True)  # libx264rgb, as the demo writes its samples
    build_pairs_dataset(scores, tmp_path / "ds", plots=False)
    original = tmp_path / "samples" / "p0_s0.mp4"
    assert preview_reason(original) == "pixel format gbrp"
    page = write_page(tmp_path / "ds", tmp_path / "review")
    assert (page["previews"], page["reasons"]) == (2, ["pixel format gbrp"])
    video = page["data"]["videos"][0]
    assert (video["path"], video["sha256"]) == (str(original), _sha(original))  # labels name the original
    preview = tmp_path / "review" / video["src"]
    assert video["src"] == f"videos/{_sha(original)[:24]}.mp4" and preview_reason(preview) is None
    shown, source = read_video(preview).float(), read_video(original).float()
    assert shown.shape == (16, 3, 256, 256)  # 32 px enlarged 8 times, whole pixels
    assert (shown[:, :, 4::8, 4::8] - source).abs().mean() < 2.0  # each pixel's colour, up to H.264's rounding
    assert (shown[:, :, 4::8, 4::8] - source).abs().max() < 40
    encoded = preview.read_bytes()
    monkeypatch.setattr("videotuna_dpo.review.page.write_preview", lambda *args: pytest.fail("encoded again"))
    assert write_page(tmp_path / "ds", tmp_path / "review")["previews"] == 2  # the last page's previews are reused
    assert preview.read_bytes() == encoded
    assert preview_reason(tmp_path / "review" / "index.html") is None  # not a video: nothing to re-encode


def test_an_eval_report_gives_base_and_tuned_pairs_with_the_scorers_win_rate(tmp_path):
    report = write_toy_eval_report(tmp_path / "report", ["a red square moving right", "a blue circle moving up",
                                                         "a green square moving left"])
    page = write_page(report, tmp_path / "review")
    data = page["data"]
    assert (data["kind"], data["roles"], data["labels"]) == ("eval", ["base", "tuned"], ["base", "tuned", "tie", "reject"])
    assert [(Path(data["videos"][p["a"]]["path"]).parent.name, Path(data["videos"][p["b"]]["path"]).name, p["seed"],
             p["run"]) for p in data["pairs"]] == [("base", "p0_s0.mp4", 1000, "run"), ("base", "p1_s0.mp4", 1001, "run"),
                                                   ("base", "p2_s0.mp4", 1002, "run")]
    assert [p["gap"] for p in data["pairs"]] == pytest.approx([0.2, -0.1, 0.2])
    assert data["runs"] == {"run": {"win_rate": pytest.approx(2 / 3), "pairs": 3}}
    assert [p["title"] for p in data["plots"]] == ["run - base: paired OmniScore differences", "Change per dimension"]


def test_bad_data_and_out_dirs_are_refused(dataset, tmp_path, capsys):
    with pytest.raises(UserError, match=r"--data .*: neither a preference dataset .* nor an eval report"):
        write_page(tmp_path, tmp_path / "review")
    with pytest.raises(UserError, match=r"--out .*ds: that is the data directory"):
        write_page(dataset / "ds", dataset / "ds")
    (tmp_path / "other" / "plots").mkdir(parents=True)
    with pytest.raises(UserError, match=r"--out .*other holds a plots/ that is not a review page's"):
        write_page(dataset / "ds", tmp_path / "other")
    assert main(["review", "--data", str(dataset / "ds"), "--out", str(tmp_path / "r"), "--port", "9"]) == 2
    assert "videotuna: error: --port is for --serve" in capsys.readouterr().err
    assert main(["review", "--data", str(dataset / "ds"), "--out", str(tmp_path / "r"), "--serve", "--port", "70000"]) == 2
    assert "videotuna: error: --port 70000: a port is 0..65535 (0: any free one)" in capsys.readouterr().err


def test_a_missing_video_is_refused_naming_it(tmp_path):
    scores = write_toy_scores(tmp_path, CAPTIONS[:1])
    build_pairs_dataset(scores, tmp_path / "ds", plots=False)
    (tmp_path / "samples" / "p0_s2.mp4").unlink()
    with pytest.raises(UserError, match=r"1 video file\(s\) missing: .*samples/p0_s2\.mp4"):
        write_page(tmp_path / "ds", tmp_path / "review")


# ---------------------------------------------------------------- the server


@pytest.fixture
def server(dataset, tmp_path):
    out = tmp_path / "review"
    page = write_page(dataset / "ds", out)
    srv = ReviewServer(out, page, out / "labels.json", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, page, out
    srv.shutdown()
    srv.server_close()


def _request(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), data


def test_the_server_listens_on_localhost_only_and_serves_the_page_and_videos(server):
    srv, page, out = server
    assert srv.server_address[0] == "127.0.0.1"
    status, headers, body = _request(srv, "GET", "/")
    assert status == 200 and body == (out / "index.html").read_bytes() and headers["Content-Type"].startswith("text/html")
    video = Path(page["files"][1])
    status, headers, body = _request(srv, "GET", "/video/1")
    assert (status, body, headers["Content-Type"]) == (200, video.read_bytes(), "video/mp4")
    status, headers, body = _request(srv, "GET", "/video/1", headers={"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, video.read_bytes()[10:20], f"bytes 10-19/{video.stat().st_size}")
    plot = page["data"]["plots"][0]["src"]
    assert _request(srv, "GET", "/" + plot)[2] == (out / plot).read_bytes()
    assert _request(srv, "GET", "/api/labels")[2] == json.dumps(
        {"format": "videotuna-review-labels", "version": 1, "kind": "pairs", "dataset": page["data"]["dataset"],
         "labels": []}).encode()


@pytest.mark.parametrize("path", ["/../scores.jsonl", "/../../etc/passwd", "/video/../../samples/p0_s0.mp4",
                                  "/%2e%2e/scores.jsonl", "/plots/..%2f..%2fscores.jsonl", "/..\\scores.jsonl"])
def test_a_path_out_of_the_page_is_refused(server, path):
    srv, _, _ = server
    status, _, body = _request(srv, "GET", path)
    assert status == 403 and b"outside the dataset" in body


@pytest.mark.parametrize("path", ["/samples/p0_s0.mp4", "/scores.jsonl", "/video/6", "/video/-1", "/labels.json",
                                  "/ds/pairs/manifest.json"])
def test_nothing_but_the_page_plots_and_numbered_videos_is_served(server, path):
    srv, _, _ = server
    assert _request(srv, "GET", path)[0] == 404


def test_requests_naming_another_host_are_refused(server):
    srv, _, _ = server
    status, _, body = _request(srv, "GET", "/", headers={"Host": "attacker.example:80"})
    assert status == 403 and b"its own address only" in body


def _entry(page, pair, label, broken=None):
    data = page["data"]
    p = data["pairs"][pair]
    a, b = data["videos"][p["a"]], data["videos"][p["b"]]
    entry = {"winner": {"path": a["path"], "sha256": a["sha256"]}, "loser": {"path": b["path"], "sha256": b["sha256"]},
             "prompt": p["prompt"], "label": label}
    if broken:
        entry["broken"] = broken
    return entry


def _post(srv, body, content_type="application/json"):
    status, _, data = _request(srv, "POST", "/api/labels", body=json.dumps(body), headers={"Content-Type": content_type})
    return status, json.loads(data)


def test_each_posted_label_is_written_to_labels_json(server):
    srv, page, out = server
    assert _post(srv, {"set": _entry(page, 0, "flip")}) == (200, {"labels": 1, "file": str(out / "labels.json")})
    assert _post(srv, {"set": _entry(page, 3, "reject", ["winner"])})[1]["labels"] == 2
    written = json.loads((out / "labels.json").read_text())
    assert [(e["label"], e.get("broken")) for e in written["labels"]] == [("flip", None), ("reject", ["winner"])]
    assert written["kind"] == "pairs" and written["dataset"] == page["data"]["dataset"]
    assert _post(srv, {"set": _entry(page, 0, "keep")})[1]["labels"] == 2  # a pair's label is replaced
    entry = _entry(page, 3, "tie")
    assert _post(srv, {"clear": [entry["winner"]["path"], entry["loser"]["path"]]})[1]["labels"] == 1
    assert [e["label"] for e in json.loads((out / "labels.json").read_text())["labels"]] == ["keep"]
    assert json.loads(_request(srv, "GET", "/api/labels")[2])["labels"][0]["label"] == "keep"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_bad_labels_are_refused_and_nothing_is_written(server):
    srv, page, out = server
    status, body = _post(srv, {"set": _entry(page, 0, "maybe")})
    assert status == 400 and body["error"] == "label.label: expected one of keep, flip, tie, reject, got 'maybe'"
    changed = _entry(page, 0, "keep")
    changed["loser"]["sha256"] = "0" * 64
    status, body = _post(srv, {"set": changed})
    assert status == 400 and re.fullmatch(r"label: loser video .*p0_s1\.mp4 has sha256 [0-9a-f]{12}\.\.\. on this "
                                          r"page, not 000000000000\.\.\.", body["error"])
    assert _post(srv, {"set": _entry(page, 0, "keep")}, content_type="text/plain")[0] == 415
    assert _request(srv, "POST", "/api/labels", body="{", headers={"Content-Type": "application/json"})[0] == 400
    assert not (out / "labels.json").exists()


def test_a_port_in_use_is_a_clear_error(dataset, tmp_path):
    out = tmp_path / "review"
    page = write_page(dataset / "ds", out)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=rf"--port {port}: 127\.0\.0\.1:{port} is in use \(another review server\?\); "
                                            rf"give another --port, or --port 0 for any free one"):
            ReviewServer(out, page, out / "labels.json", port)


def test_labels_json_of_another_dataset_is_refused_when_serving(dataset, tmp_path):
    other = tmp_path / "other"
    build_pairs_dataset(write_toy_scores(other, CAPTIONS[:1]), other / "ds", plots=False)
    other_page = write_page(other / "ds", other / "review")
    (tmp_path / "labels.json").write_text(json.dumps({
        "format": "videotuna-review-labels", "version": 1, "kind": "pairs", "dataset": str(other / "ds"),
        "labels": [_entry(other_page, 0, "keep")]}))
    page = write_page(dataset / "ds", tmp_path / "review")
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'labels.json'}: none of the 2 videos its labels name is "
                                                  f"in the data of this page") + ".*another dataset"):
        ReviewServer(tmp_path / "review", page, tmp_path / "labels.json", 0)


def test_the_cli_serves_on_the_port_it_prints(dataset, tmp_path):
    out = tmp_path / "review"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "videotuna_dpo", "review", "--data", str(dataset / "ds"), "--out",
                             str(out), "--serve", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().startswith(f"review page of 6 pairs (6 videos): {out / 'index.html'}")
        line = proc.stdout.readline()
        match = re.fullmatch(r"serving 6 pairs on http://127\.0\.0\.1:(\d+)/ \(labels are written to (.*)\); Ctrl-C stops\n",
                             line)
        assert match and match.group(2) == str(out / "labels.json"), line
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=10)
        conn.request("GET", "/review.js")
        assert conn.getresponse().read() == (out / "review.js").read_bytes()
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
