"""Take the MLflow UI screenshots used in docs/lineage.md.

Not part of the package: nothing imports it and the tests do not run it.  It
drives a real headless Chromium with Playwright, in a venv of its own (not the
project's .venv), using the system browser so that `playwright install` (a
download) is never needed:

    apt-get install -y chromium
    python3 -m venv /tmp/shotvenv && /tmp/shotvenv/bin/pip install playwright
    /tmp/shotvenv/bin/python docs/tools/screenshot_mlflow.py \\
        sqlite:////path/to/wd/mlflow.db --gallery ops --out docs/img

The first argument is either a tracking DB URI (sqlite:///...) or the URL of a
running MLflow server (http://127.0.0.1:5000).  For a DB URI the script copies
the DB file to a temporary folder (the original is never written to) and
serves the copy with `mlflow server` (--mlflow, default: the project's
.venv/bin/mlflow); run artifacts are read from the artifact URIs recorded in
the DB, so they must still exist on this machine.

It writes three PNGs to --out:
  lineage-runs.png   experiment runs table filtered to the gallery, the newest
                     finished `upgrade` runs expanded to their stage child runs,
                     with the carryover.stage/from_version/to_version/error tags
                     added as columns
  lineage-run.png    the newest finished `upgrade` run (Overview: child runs,
                     tags)
  lineage-model.png  the `<gallery>-embedder` registered model: versions, their
                     tags and aliases (serving / candidate)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Tag columns to add to the runs table, with the width (px) to drag each to.
TAG_COLUMNS = {
    "carryover.stage": 120,
    "carryover.from_version": 150,
    "carryover.to_version": 140,
    "carryover.error": 230,
}


def api(base: str, path: str, body: dict | None = None) -> dict:
    """Call the MLflow REST API (GET with query params, or POST with a JSON body)."""
    url = f"{base}/api/2.0/mlflow/{path}"
    if body is None:
        req = urllib.request.Request(url)
    else:
        req = urllib.request.Request(
            url, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def start_server(db_uri: str, mlflow_bin: str, port: int, tmp: Path) -> subprocess.Popen:
    """Serve a copy of the sqlite DB with `mlflow server` and wait until it answers."""
    src = Path(urllib.parse.urlparse(db_uri).path)
    shutil.copy2(src, tmp / "mlflow.db")
    cmd = [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(1)
    proc.kill()
    sys.exit(f"mlflow server did not start; see {tmp / 'server.log'}")


def find_runs(base: str, experiment: str, gallery: str) -> tuple[str, list[dict]]:
    """The experiment id and the gallery's finished `upgrade` runs, newest first."""
    exp = api(base, f"experiments/get-by-name?experiment_name={experiment}")["experiment"]
    flt = f"tags.`carryover.gallery` = '{gallery}' and tags.`carryover.step` = 'upgrade'"
    flt += " and attributes.status = 'FINISHED'"
    body = {"experiment_ids": [exp["experiment_id"]], "filter": flt}
    body["order_by"] = ["attributes.start_time DESC"]
    runs = api(base, "runs/search", body).get("runs", [])
    if not runs:
        sys.exit(f"no finished upgrade runs for gallery {gallery!r} in {experiment!r}")
    return exp["experiment_id"], runs


def child_names(base: str, exp_id: str, run_id: str) -> list[str]:
    body = {"experiment_ids": [exp_id], "filter": f"tags.mlflow.parentRunId = '{run_id}'"}
    return [r["info"]["run_name"] for r in api(base, "runs/search", body).get("runs", [])]


def prepare_ui(page: Page, base: str) -> None:
    """Close the assistant panel and pick the "Model training" sidebar (kept in localStorage)."""
    page.goto(f"{base}/#/experiments")
    page.get_by_text("Model training", exact=True).click()
    close = page.get_by_role("button", name="Close")
    with contextlib.suppress(Exception):  # no assistant panel in this MLflow build
        close.first.click(timeout=5000)


def shot_runs(page: Page, base: str, exp_id: str, gallery: str, expand: list[str], out: Path):
    query = urllib.parse.urlencode({"searchFilter": f"tags.carryover.gallery = '{gallery}'"})
    page.goto(f"{base}/#/experiments/{exp_id}/runs?{query}")
    page.locator(f".ag-row[row-id='{expand[0]}']").first.wait_for()
    # Columns: drop the empty default attribute columns, add the carryover tags.
    page.get_by_role("button", name="Columns").click()
    tree = page.get_by_test_id("column-selector-tree")
    for name in ["Dataset", "Source", "Models"]:
        tree.locator(f'span[title="{name}"]').click()
    search = page.get_by_placeholder("Search columns")
    for col in TAG_COLUMNS:
        search.fill(col)
        tree.locator(f'span[title="{col}"]').click()
    page.keyboard.press("Escape")
    # Widen the tag columns by dragging their header resize handles.
    for col, width in TAG_COLUMNS.items():
        header = page.locator(f".ag-header-cell[col-id='tags.`{col}`']")
        box = header.bounding_box()
        handle = header.locator(".ag-header-cell-resize").bounding_box()
        if not box or not handle:
            continue
        x, y = handle["x"] + 1, handle["y"] + handle["height"] / 2
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + width - box["width"], y, steps=5)
        page.mouse.up()
    # Expand the upgrade runs, lowest row first so rows above do not move.
    for run_id in reversed(expand):
        row = page.locator(f".ag-pinned-left-cols-container .ag-row[row-id='{run_id}']")
        row.locator("[col-id='attributes.`Run Name`'] button").first.click()
        page.wait_for_timeout(1000)
    page.mouse.click(5, 5)  # drop the focus ring
    page.wait_for_timeout(1000)
    page.screenshot(path=out)


def shot_run(page: Page, base: str, exp_id: str, run_id: str, children: list[str], out: Path):
    page.goto(f"{base}/#/experiments/{exp_id}/runs/{run_id}")
    page.get_by_text("carryover.to_version").first.wait_for()
    if children:  # the "Child runs" row loads separately
        page.get_by_role("link", name=children[0], exact=True).first.wait_for()
    page.wait_for_timeout(1500)
    page.screenshot(path=out)


def shot_model(page: Page, base: str, model: str, out: Path):
    page.goto(f"{base}/#/models/{model}")
    page.get_by_text("Version 1", exact=True).wait_for()
    page.get_by_text("serving").first.wait_for()
    page.wait_for_timeout(1500)
    page.screenshot(path=out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target", help="tracking DB URI (sqlite:///...) or MLflow server URL")
    ap.add_argument("--gallery", default="ops")
    ap.add_argument("--experiment", default="carryover")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--expand", type=int, default=2, help="finished upgrade runs to expand")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--mlflow", default=str(REPO / ".venv" / "bin" / "mlflow"))
    ap.add_argument("--port", type=int, default=5077)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mlflow-shots-"))
    server = None
    if args.target.startswith("sqlite:"):
        server = start_server(args.target, args.mlflow, args.port, tmp)
        base = f"http://127.0.0.1:{args.port}"
    else:
        base = args.target.rstrip("/")
    try:
        exp_id, runs = find_runs(base, args.experiment, args.gallery)
        newest = runs[0]["info"]["run_id"]
        expand = [r["info"]["run_id"] for r in runs[: args.expand]]
        args.out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            # The runs table needs a taller window to show two expanded upgrades.
            page = browser.new_page(viewport={"width": 1400, "height": 1040})
            prepare_ui(page, base)
            shot_runs(page, base, exp_id, args.gallery, expand, args.out / "lineage-runs.png")
            page.set_viewport_size({"width": 1400, "height": 900})
            children = child_names(base, exp_id, newest)
            shot_run(page, base, exp_id, newest, children, args.out / "lineage-run.png")
            shot_model(page, base, f"{args.gallery}-embedder", args.out / "lineage-model.png")
            browser.close()
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    for name in ["lineage-runs.png", "lineage-run.png", "lineage-model.png"]:
        print(args.out / name)


if __name__ == "__main__":
    main()
