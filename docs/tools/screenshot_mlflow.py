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

It writes six PNGs to --out (--only takes a comma-separated subset: runs,run,...):
  lineage-runs.png          experiment runs table filtered to the gallery, the newest
                            finished `upgrade` runs expanded to their stage child runs,
                            the Dataset column, and the carryover.stage/from_version/
                            to_version tags (and carryover.error, where a run has it)
  lineage-run.png           the newest finished `upgrade` run (Overview: child runs,
                            Datasets, tags)
  lineage-inputs.png        that upgrade's `execute` stage run (--inputs-run): its Datasets
                            box (the gallery version it read, +N: the images it
                            re-embedded) and its Logged models table (the models it applied)
  lineage-dataset.png       the same page with its first dataset clicked: the Data details
                            drawer (every dataset of the run; profile, digest, source)
  lineage-model.png         the `<gallery>-embedder` registered model: versions, their
                            tags and aliases (serving / candidate)
  lineage-logged-model.png  the LoggedModel behind `<gallery>-embedder@serving`, Artifacts
                            tab, its MLmodel file open: pyfunc flavor, signature

Each shot waits on page elements (the dataset names and digests and the number of models
that the REST API reports, the MLmodel's signature), then until no REST call has been in
flight for 0.8 s and no animation runs. It prints what the API says the stage run logged,
and stops if that is nothing: an empty box is a tracking bug, not a picture to keep.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
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
DATASET_WIDTH = 250  # px: the first dataset "name (digest)", then "… +N"
SHOTS = ["runs", "run", "inputs", "dataset", "model", "logged-model"]
# Tag columns to add to the runs table, with the width (px) to drag each to.
TAG_COLUMNS = {
    "carryover.stage": 110,
    "carryover.from_version": 145,
    "carryover.to_version": 130,
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
    # its own process group: `mlflow server` starts uvicorn and huey consumers; stop_server
    # ends them all
    proc = subprocess.Popen(
        cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(1)
    stop_server(proc)
    sys.exit(f"mlflow server did not start; see {tmp / 'server.log'}")


def stop_server(proc: subprocess.Popen) -> None:
    """End the server's whole process group: mlflow, uvicorn and the huey job consumers
    (those ignore SIGTERM for long: whatever is left after 10 s gets SIGKILL)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


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


def child_runs(base: str, exp_id: str, run_id: str) -> dict[str, str]:
    """The child runs of `run_id`, newest first: name -> run id."""
    body = {"experiment_ids": [exp_id], "filter": f"tags.mlflow.parentRunId = '{run_id}'"}
    body["order_by"] = ["attributes.start_time DESC"]
    runs = api(base, "runs/search", body).get("runs", [])
    out: dict[str, str] = {}
    for r in runs:
        out.setdefault(r["info"]["run_name"], r["info"]["run_id"])
    return out


def run_inputs(base: str, run_id: str) -> tuple[list[dict], list[str]]:
    """What the run page's Datasets and Logged models boxes show: the run's dataset inputs
    (name, digest, context) and its logged model ids (inputs, then outputs)."""
    run = api(base, f"runs/get?run_id={run_id}")["run"]
    datasets = []
    for d in run.get("inputs", {}).get("dataset_inputs", []):
        tags = {t["key"]: t["value"] for t in d.get("tags", [])}
        datasets.append({**d["dataset"], "context": tags.get("mlflow.data.context")})
    models = [m["model_id"] for m in run.get("inputs", {}).get("model_inputs", [])]
    models += [m["model_id"] for m in run.get("outputs", {}).get("model_outputs", [])]
    return datasets, models


def serving_model_id(base: str, model: str) -> str:
    """The LoggedModel behind the registered model's @serving version."""
    mv = api(base, f"registered-models/alias?name={model}&alias=serving")["model_version"]
    tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
    model_id = mv.get("model_id") or tags.get("carryover.model_id")
    if not model_id:
        sys.exit(f"{model}@serving (version {mv['version']}) has no logged model")
    return model_id


class Inflight:
    """Counts the page's requests in flight (the UI's REST calls), so a shot can wait until
    the page has fetched what it shows. A hash route changes no load state: Playwright's
    "networkidle" would not wait for it."""

    def __init__(self, page: Page) -> None:
        self.pending: set = set()
        self.last = time.monotonic()
        page.on("request", self._start)
        page.on("requestfinished", self._end)
        page.on("requestfailed", self._end)
        WATCHED[page] = self

    def _start(self, req) -> None:
        if req.resource_type not in ("fetch", "xhr"):  # e.g. the telemetry worker never ends
            return
        self.pending.add(req)
        self.last = time.monotonic()

    def _end(self, req) -> None:
        self.pending.discard(req)
        self.last = time.monotonic()

    def quiet_for(self, seconds: float) -> bool:
        return not self.pending and time.monotonic() - self.last >= seconds


WATCHED: dict[Page, Inflight] = {}


def settle(page: Page, quiet_s: float = 0.8, timeout_s: float = 60) -> None:
    """Wait until no request has been in flight for `quiet_s` and no spinner shows."""
    inflight = WATCHED[page]
    deadline = time.monotonic() + timeout_s
    while not inflight.quiet_for(quiet_s):
        if time.monotonic() > deadline:
            busy = ", ".join(sorted(r.url for r in inflight.pending)) or "a request every moment"
            sys.exit(f"{page.url}: not settled after {timeout_s:.0f} s: {busy}")
        page.wait_for_timeout(100)  # lets Playwright deliver the request events
    page.locator("[class*='spinner'], [data-testid*='spinner']").first.wait_for(state="hidden")
    # and no transition running (a drawer sliding in, a row expanding)
    page.wait_for_function("document.getAnimations().every(a => a.playState !== 'running')")


def snap(page: Page, out: Path) -> None:
    """Park the mouse on the logo (no row left hovered), let the page settle, take the PNG."""
    page.mouse.move(1, 1)
    settle(page)
    page.screenshot(path=out)


def prepare_ui(page: Page, base: str) -> None:
    """Close the assistant panel and pick the "Model training" sidebar (kept in localStorage)."""
    page.goto(f"{base}/#/experiments")
    page.get_by_text("Model training", exact=True).click()
    close = page.get_by_role("button", name="Close")
    with contextlib.suppress(Exception):  # no assistant panel in this MLflow build
        close.first.click(timeout=5000)


def resize_column(page: Page, col_id: str, width: int) -> None:
    header = page.locator(f".ag-header-cell[col-id='{col_id}']")
    box = header.bounding_box()
    handle = header.locator(".ag-header-cell-resize").bounding_box()
    if not box or not handle:
        return
    x, y = handle["x"] + 1, handle["y"] + handle["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + width - box["width"], y, steps=5)
    page.mouse.up()


def tag_keys(base: str, exp_id: str, gallery: str) -> set[str]:
    """The tag keys the gallery's runs carry (a history without failures has no
    carryover.error column to add)."""
    body = {"experiment_ids": [exp_id], "filter": f"tags.`carryover.gallery` = '{gallery}'"}
    body["max_results"] = 1000
    runs = api(base, "runs/search", body).get("runs", [])
    return {t["key"] for r in runs for t in r["data"].get("tags", [])}


def shot_runs(
    page: Page, base: str, exp_id: str, gallery: str, expand: list[tuple[str, str]], out: Path
):
    query = urllib.parse.urlencode({"searchFilter": f"tags.carryover.gallery = '{gallery}'"})
    page.goto(f"{base}/#/experiments/{exp_id}/runs?{query}")
    page.locator(f".ag-row[row-id='{expand[0][0]}']").first.wait_for()
    # Columns: keep Dataset (each run's input datasets), drop the empty Source and the Models
    # column (the run pages show them), add the carryover tags.
    page.get_by_role("button", name="Columns").click()
    tree = page.get_by_test_id("column-selector-tree")
    for name in ["Source", "Models"]:
        tree.locator(f'span[title="{name}"]').click()
    search = page.get_by_placeholder("Search columns")
    present = tag_keys(base, exp_id, gallery)
    columns = {col: width for col, width in TAG_COLUMNS.items() if col in present}
    for col in columns:
        search.fill(col)
        tree.locator(f'span[title="{col}"]').click()
    page.keyboard.press("Escape")
    # Narrow the Dataset column to its first dataset and "+N", widen the tag columns: drag
    # their header resize handles.
    widths = {"attributes.`Dataset`": DATASET_WIDTH}
    widths.update({f"tags.`{col}`": width for col, width in columns.items()})
    for col_id, width in widths.items():
        resize_column(page, col_id, width)
    # Expand the upgrade runs, lowest row first so rows above do not move; each is open when
    # its first stage run's row shows.
    for run_id, child_id in reversed(expand):
        row = page.locator(f".ag-pinned-left-cols-container .ag-row[row-id='{run_id}']")
        row.locator("[col-id='attributes.`Run Name`'] button").first.click()
        page.locator(f".ag-row[row-id='{child_id}']").first.wait_for()
    page.mouse.click(5, 5)  # drop the focus ring
    snap(page, out)


def shot_run(page: Page, base: str, exp_id: str, run_id: str, children: list[str], out: Path):
    page.goto(f"{base}/#/experiments/{exp_id}/runs/{run_id}")
    page.get_by_text("carryover.to_version").first.wait_for()
    if children:  # the "Child runs" row loads separately
        page.get_by_role("link", name=children[0], exact=True).first.wait_for()
    snap(page, out)


def shot_model(page: Page, base: str, model: str, out: Path):
    page.goto(f"{base}/#/models/{model}")
    page.get_by_text("Version 1", exact=True).wait_for()
    page.get_by_text("serving").first.wait_for()
    snap(page, out)


def shot_inputs(
    page: Page, base: str, exp_id: str, run_id: str, inputs: tuple[list[dict], list[str]], out: Path
):
    """A stage run's page: its Datasets box (the first dataset, +N) and its Logged models
    table (the models it used, as inputs)."""
    datasets, models = inputs
    page.goto(f"{base}/#/experiments/{exp_id}/runs/{run_id}")
    page.get_by_text("carryover.to_version").first.wait_for()
    first = f"{datasets[0]['name']} ({datasets[0]['digest']})"
    page.get_by_text(first, exact=True).first.wait_for()
    page.get_by_text(f"Logged models ({len(models)})").wait_for()
    page.get_by_text("Ready", exact=True).nth(len(models) - 1).wait_for()
    snap(page, out)


def shot_dataset(page: Page, datasets: list[dict], out: Path):
    """On the run page shot_inputs left: click the first dataset; the drawer lists the run's
    datasets and shows the first one's profile, digest and source."""
    page.get_by_text(f"{datasets[0]['name']} ({datasets[0]['digest']})", exact=True).first.click()
    page.get_by_text(f"{len(datasets)} datasets used").wait_for()
    page.get_by_text(datasets[0]["digest"], exact=True).last.wait_for()
    page.get_by_text("Source type:").wait_for()
    snap(page, out)


def shot_logged_model(page: Page, base: str, exp_id: str, model_id: str, out: Path):
    """A LoggedModel's Artifacts tab with its MLmodel file open: the pyfunc flavor (models from
    code), the artifacts, the signature's inputs and outputs."""
    page.goto(f"{base}/#/experiments/{exp_id}/models/{model_id}/artifacts")
    page.get_by_text("MLmodel", exact=True).first.click()
    page.get_by_text("signature:").first.wait_for()
    snap(page, out)


def take_shots(page: Page, base: str, args: argparse.Namespace) -> list[Path]:
    exp_id, runs = find_runs(base, args.experiment, args.gallery)
    newest = runs[0]["info"]["run_id"]
    children = child_runs(base, exp_id, newest)
    expand = []
    for r in runs[: args.expand]:
        run_id = r["info"]["run_id"]
        expand.append((run_id, next(iter(child_runs(base, exp_id, run_id).values()))))
    model = f"{args.gallery}-embedder"
    shots = {name: args.out / f"lineage-{name}.png" for name in SHOTS}
    todo = set(args.only.split(",")) if args.only else set(SHOTS)
    prepare_ui(page, base)
    if "runs" in todo:  # a taller window shows two expanded upgrades
        page.set_viewport_size({"width": 1400, "height": 1040})
        shot_runs(page, base, exp_id, args.gallery, expand, shots["runs"])
    page.set_viewport_size({"width": 1400, "height": 900})
    if "run" in todo:
        shot_run(page, base, exp_id, newest, list(children), shots["run"])
    if "inputs" in todo or "dataset" in todo:
        run_id = children.get(args.inputs_run, newest)
        inputs = run_inputs(base, run_id)
        print(f"{args.inputs_run} run {run_id}: datasets {inputs[0]}, logged models {inputs[1]}")
        if not inputs[0] or not inputs[1]:  # nothing for the boxes to show: a tracking bug
            sys.exit(f"run {run_id} ({args.inputs_run}) logged no datasets or no models")
        page.set_viewport_size({"width": 1400, "height": 1100})  # down to the models table
        shot_inputs(page, base, exp_id, run_id, inputs, shots["inputs"])
        if "dataset" in todo:
            page.set_viewport_size({"width": 1400, "height": 600})
            shot_dataset(page, inputs[0], shots["dataset"])
        page.set_viewport_size({"width": 1400, "height": 900})
    if "model" in todo:
        shot_model(page, base, model, shots["model"])
    if "logged-model" in todo:
        shot_logged_model(page, base, exp_id, serving_model_id(base, model), shots["logged-model"])
    return [shots[n] for n in SHOTS if n in todo]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target", help="tracking DB URI (sqlite:///...) or MLflow server URL")
    ap.add_argument("--gallery", default="ops")
    ap.add_argument("--experiment", default="carryover")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--expand", type=int, default=2, help="finished upgrade runs to expand")
    ap.add_argument("--inputs-run", default="execute", help="stage run for lineage-inputs.png")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SHOTS)}")
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
        args.out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                Inflight(page)
                written = take_shots(page, base, args)
            finally:
                browser.close()
    finally:
        if server:
            stop_server(server)
        shutil.rmtree(tmp, ignore_errors=True)
    for path in written:
        print(path, f"{path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
