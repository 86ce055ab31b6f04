"""Benchmark on real photographs with pretrained models: an existing gallery embedded by
EfficientNet-Lite0 (1,280-d) is adopted and upgraded to EfficientNet-Lite1 with the `carryover`
CLI, labelled and unlabelled, beside a ridge least-squares map; writes docs/results-real.md.

    python jobs/benchmark_real.py              # the full run (make bench-real)
    python jobs/benchmark_real.py --quick      # smoke run: tiny random models, 8 pictures
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/...` from the root

from jobs.real_page import existing_vs_ingest, ridge_case, skip_case, write_page  # noqa: E402
from jobs.real_photos import write_crop_folders  # noqa: E402
from pipeline.config import DataConfig  # noqa: E402
from pipeline.data.prepare import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIDE_EPOCHS = {False: 4, True: 1}
# augmented views of each training image for h (FCT trains on augmented images); the smoke
# run keeps one, which exercises the same path at a fifth of the pairs' embedding
AUGMENT_COPIES = {False: 4, True: 1}
SIDE_SIZE = 64  # side-info's own input size: half the old model's 128 px, a quarter the pixels
CLI = str(Path(sys.executable).parent / "carryover")


def carryover(args: list[str], log: Path) -> tuple[float, str]:
    """Run one `carryover` command; its wall seconds and stdout (the log keeps both streams)."""
    t0 = time.perf_counter()
    r = subprocess.run([CLI, *args], capture_output=True, text=True, cwd=ROOT)
    secs = round(time.perf_counter() - t0, 1)
    with log.open("a") as f:
        f.write(
            f"$ carryover {' '.join(args)}  # {secs} s, rc {r.returncode}\n{r.stdout}\n{r.stderr}\n"
        )
    if r.returncode != 0:
        raise SystemExit(f"carryover {args[0]} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    print(f"carryover {' '.join(args[:1])}: {secs} s", flush=True)
    return secs, r.stdout


def embed_existing(images: Path, model: dict, out: Path, batch: int = 64) -> float:
    """The user's own job: the old model over every image, streamed to Parquet (key, embedding)
    one file per image shard, never through carryover. Its seconds."""
    t0, net = time.perf_counter(), torch.jit.load(model["file"]).eval()
    pre, dim = model["preprocess"], model["embedding_dim"]
    mean, std = (torch.tensor(pre[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    schema = pa.schema([("key", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
    out.mkdir(parents=True, exist_ok=True)
    for shard in sorted(images.glob("shard-*.parquet")):
        with pq.ParquetWriter(out / shard.name.replace("shard", "part"), schema) as w:
            for b in pq.ParquetFile(shard).iter_batches(batch, columns=["key", "image"]):
                px = [_pixels(x, pre["input_size"]) for x in b.column("image").to_pylist()]
                with torch.no_grad():
                    e = net((torch.from_numpy(np.stack(px)) - mean) / std).numpy()
                flat = pa.array(e.astype(np.float32).ravel())
                w.write_batch(
                    pa.record_batch(
                        [b.column("key"), pa.FixedSizeListArray.from_arrays(flat, dim)],
                        schema=schema,
                    )
                )
    return round(time.perf_counter() - t0, 1)


def _pixels(data: bytes, size: int) -> np.ndarray:
    im = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0


def brought(name: str, m: dict) -> dict:
    """A model config section for an exported TorchScript model."""
    arch = {"embedding_dim": m["embedding_dim"]}
    return {"name": name, "uri": m["file"], "preprocess": m["preprocess"], "architecture": arch}


def config(work: Path, images: Path, models: dict, quick: bool) -> Path:
    """The upgrade's YAML: brought TorchScript models with their preprocess, cheap side-info."""
    cfg = {
        "gallery_name": "photos",
        "workdir": str(work),
        "images": str(images),
        "old_model": brought("lite0", models["old"]),
        "new_model": brought("lite1", models["new"]),
        # side-info: a small SimCLR net at half the old model's resolution, a few epochs
        # (its cost beside the ingest's)
        "side_info": {
            "architecture": {"widths": [8, 16, 32], "embedding_dim": 16, "num_classes": 2},
            "preprocess": {**models["old"]["preprocess"], "input_size": SIDE_SIZE},
            "train": {"epochs": SIDE_EPOCHS[quick]},
        },
        # augmented views of each training image beside it (FCT trains on augmented images):
        # four give 5x the pairs for h and its ridge skip, for ~1.5 min more embedding
        "transformation": {
            "augment_copies": AUGMENT_COPIES[quick],
            "train": {"epochs": 3 if quick else 40},
        },
        "adapters": {"epochs": 20 if quick else 200},
        "embed": {"batch_size": 64},
        "plan": {"budget_fraction": 0.25, "measure_rows": 32 if quick else 256},
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def adopt(cfg: Path, existing: Path, images: Path, models: dict, log: Path) -> dict:
    """`carryover import` of the existing gallery: no re-embedding."""
    args = ["import", str(existing), "-c", str(cfg), "--model-uri", models["old"]["file"]]
    secs, _ = carryover([*args, "--images", str(images), "--version", "lite0", "--json"], log)
    return {"how": "carryover import", "seconds": secs}


def upgrade(cfg: Path, target: str, sets: list[str], until: str | None, log: Path) -> dict:
    """One `carryover upgrade` into `target`; its JSON report with the wall seconds."""
    rep = cfg.parent / f"report-{target}.json"
    args = [
        "upgrade",
        "-c",
        str(cfg),
        "-s",
        f"plan.target_version={target}",
        "--quiet",
        "--report",
        str(rep),
    ]
    secs, _ = carryover(
        [*args, *[a for s in sets for a in ("-s", s)], *(["--until", until] if until else [])], log
    )
    return {**json.loads(rep.read_text()), "wall_seconds": secs}


def unlabelled_copy(images: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(images.glob("shard-*.parquet")):
        t = pq.read_table(f)
        i = t.schema.get_field_index("label")
        pq.write_table(t.set_column(i, "label", pa.nulls(len(t), pa.int64())), out / f.name)
    return out


def run_all(work: Path, quick: bool, crops: int, shards: int) -> dict:
    """Every step, in order: models, photographs, the user's own job, adoption, the backfill,
    the upgrades and the ridge baseline; their figures."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "commands.log"
    exp = [sys.executable, str(ROOT / "jobs/export_real_models.py"), "--out", str(work / "models")]
    subprocess.run([*exp, *(["--tiny"] if quick else [])], check=True, capture_output=True)
    models = json.loads((work / "models/models.json").read_text())
    data = write_crop_folders(
        work / "photos",
        12 if quick else crops,
        models["new"]["preprocess"]["input_size"],
        quick,
    )
    images = work / "images"
    prepare(str(work / "photos"), str(images), 2 if quick else shards, None, DataConfig())
    res = {
        "data": data,
        "models": models,
        "quick": quick,
        "side_epochs": SIDE_EPOCHS[quick],
        "side_size": SIDE_SIZE,
        "augment_copies": AUGMENT_COPIES[quick],
    }
    res["existing_seconds"] = embed_existing(images, models["old"], work / "existing")
    lab, unl = work / "labelled", work / "unlabelled"
    cfg = config(lab, images, models, quick)
    res["adopt"] = adopt(cfg, work / "existing", images, models, log)
    res["backfill_seconds"], _ = carryover(["backfill", "-c", str(cfg), "--quiet"], log)
    res["planned"] = upgrade(cfg, "lite1-planned", [], None, log)
    res["ridge"] = ridge_case(lab / "gallery", images)
    res["skip"] = skip_case(lab / "gallery", images, lab / "models" / "fct")
    # FCT + side-info needs side-info stored beside every old embedding: a gallery that
    # carryover ingests itself (old model + the 64 px side-info model), not an adopted one
    cfg_s = config(work / "ingested", images, models, quick)
    res["side"] = upgrade(cfg_s, "lite1-side", [], "evaluate", log)
    res["existing_max_abs_diff"] = existing_vs_ingest(work / "existing", lab / "gallery")
    cfg_u = config(unl, unlabelled_copy(images, work / "images-unlabelled"), models, quick)
    res["adopt_unlabelled"] = adopt(
        cfg_u, work / "existing", work / "images-unlabelled", models, log
    )
    res["unlabelled"] = upgrade(cfg_u, "lite1-planned", [], None, log)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", default=".carryover-bench-real")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: tiny RANDOM models, 8 pictures"
    )
    ap.add_argument("--crops", type=int, default=10, help="random crops per photograph")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument(
        "--out",
        default=None,
        help="markdown page (default docs/results-real.md; --quick: <workdir>/results-real.md)",
    )
    ap.add_argument("--json", default=None, help="write every figure here as JSON")
    ap.add_argument("--page-from", default=None, help="rewrite the page from a --json file")
    args = ap.parse_args()
    if args.page_from:  # the page's wording changed, the figures did not: no rerun
        res = json.loads(Path(args.page_from).read_text())
        print(write_page(res, Path(args.out or ROOT / "docs/results-real.md")))
        return 0
    t_start, work = time.perf_counter(), Path(args.workdir).resolve()
    res = run_all(work, args.quick, args.crops, args.shards)
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(
        args.out or (work / "results-real.md" if args.quick else ROOT / "docs/results-real.md")
    )
    if args.json:  # first: a page that fails to render loses no figure (see --page-from)
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    print(write_page(res, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
