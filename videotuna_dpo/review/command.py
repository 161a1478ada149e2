"""The ``videotuna review`` verb."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Write a page that shows every pair of a preference dataset (--data DIR with train_data.yaml, as
`videotuna pairs` writes it) or of an eval report (--data REPORT with report.json, as `videotuna eval`
writes it): both videos side by side playing in sync, the caption, OmniScore and every dimension of
both, the gap, pair probability and weight; sorting and filtering; labels by mouse or keyboard (keep,
flip, tie, reject; on a report: base better, tuned better, tie, reject) and an overview (the dataset's
plots, and how often people overruled the scorer, by dimension). The page is plain HTML/CSS/JS and
works offline: open OUT/index.html from disk (labels are kept in that browser; Export writes
labels.json), or --serve it on 127.0.0.1, which writes every label to labels.json at once.
Apply the labels with `videotuna pairs --scores scores.jsonl --labels labels.json --out ...`.
"""


def _cmd_review(args: argparse.Namespace) -> int:
    from videotuna_dpo.errors import UserError
    from videotuna_dpo.review.page import write_page

    if args.port is not None and not args.serve:
        raise UserError("--port is for --serve; without it the page opens from disk")
    if args.labels is not None and not args.serve:
        raise UserError("--labels is for --serve; a page opened from disk keeps labels in the browser "
                        "(its Import button reads a labels.json)")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: a port is 0..65535 (0: any free one)")
    out = Path(args.out)
    page = write_page(args.data, out)
    what = "pairs" if page["kind"] == "pairs" else "base/tuned pairs"
    print(f"review page of {page['pairs']} {what} ({page['videos']} videos): {page['html']}")
    if page["previews"]:
        print(f"{page['previews']} video(s) re-encoded for the browser under {out / 'videos'} "
              f"({', '.join(page['reasons'])}: browsers do not show it as it is); labels still name the originals")
    if not args.serve:
        print("open it in a browser; labels are kept in that browser: its Export button writes labels.json "
              "(or run with --serve to have every label written to disk)")
        return 0
    from videotuna_dpo.review.server import serve

    labels = Path(args.labels) if args.labels else out / "labels.json"
    return serve(out, page, labels, 8765 if args.port is None else args.port)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``review`` verb on the ``videotuna`` subparsers."""
    p = subparsers.add_parser(
        "review",
        help="a page to watch and label the pairs of a dataset (or an eval report) by hand",
        description=DESCRIPTION,
        epilog="example: videotuna review --data demo_out/pairs --out demo_out/review --serve --port 8765",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="preference dataset dir (or its train_data.yaml), or an eval report dir")
    p.add_argument("--out", required=True, help="directory of the page (index.html, plots/; labels.json with --serve)")
    p.add_argument("--serve", action="store_true", help="serve the page on 127.0.0.1 and write labels to disk")
    p.add_argument("--port", type=int, default=None, help="port of --serve (default 8765; 0 = any free port)")
    p.add_argument("--labels", default=None, help="labels file --serve reads and writes (default OUT/labels.json)")
    p.set_defaults(func=_cmd_review)
    return p
