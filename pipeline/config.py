"""Typed configuration for carryover: every default is written once, here."""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal

import yaml
from croniter import croniter
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.choices import ADAPTER_KINDS, AdapterKind


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key and the reason."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last one,
    silently dropping the first (a whole section, when the key is a section)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys given next to a `<<` merge override the merged ones on purpose
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            continue  # construct_mapping reports an unhashable key itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


class _Model(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Model):
    """Options for s3:// URIs (ignored for local paths). Credentials default to the environment."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    anon: bool = False
    retries: int = Field(5, ge=0, description="attempts for transient storage errors")

    def resolved(self) -> StorageConfig:
        """Fill unset fields from AWS_* environment variables (never written back to logs)."""
        env = os.environ
        return self.model_copy(
            update={
                "endpoint_url": self.endpoint_url or env.get("AWS_ENDPOINT_URL") or None,
                "access_key_id": self.access_key_id
                or (SecretStr(env["AWS_ACCESS_KEY_ID"]) if env.get("AWS_ACCESS_KEY_ID") else None),
                "secret_access_key": self.secret_access_key
                or (
                    SecretStr(env["AWS_SECRET_ACCESS_KEY"])
                    if env.get("AWS_SECRET_ACCESS_KEY")
                    else None
                ),
            }
        )


class PreprocessConfig(_Model):
    """How encoded images become model input: size, channels and normalisation."""

    input_size: int = Field(16, ge=4, le=1024)
    channels: Literal[1, 3] = 1
    mean: list[float] = [0.5]
    std: list[float] = [0.5]

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v


class ArchitectureConfig(_Model):
    """A small ResNet-style backbone written in plain torch."""

    widths: list[int] = [16, 32, 64]
    blocks_per_stage: int = Field(1, ge=1, le=8)
    embedding_dim: int = Field(64, ge=2, le=4096)
    num_classes: int = Field(10, ge=2)


class CompatLossConfig(_Model):
    """Settings of the compatibility losses beyond BCT (`train.loss`: bt2, dsimplex, oca).

    BT² and OCA need no setting for their extra dimensions: they are the model's
    `architecture.embedding_dim` minus the old model's; the first (old) dims of the stored
    embedding compare to old rows, the whole vector to new rows (docs/methods.md)."""

    bt2_lambda: float = Field(
        1.0,
        ge=0,
        description="BT²: weight of the influence loss through the frozen old classifier on the "
        "compatible (first d_old) dims of the basis-transformed embedding",
    )
    oca_lambda: float = Field(
        1.0,
        ge=0,
        description="OCA: weight of the compatibility loss of the orthogonally projected "
        "embedding against the old model's class prototypes",
    )
    oca_temperature: float = Field(
        0.1,
        gt=0,
        description="OCA: temperature of the cosine-softmax over the old prototypes (cosine / T)",
    )


class TrainConfig(_Model):
    """Ray Train settings for one model."""

    epochs: int = Field(8, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    classes: list[int] | None = Field(
        None, description="train only on these labels (FCT's old model sees half the classes)"
    )
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    loss: Literal["independent", "bct", "bt2", "dsimplex", "oca"] = Field(
        "independent",
        description="independent (FCT's choice); bct: influence loss through the frozen old "
        "classifier (new classes get synthesised weights); bt2: BCT on the first d_old dims of "
        "a learned orthogonal basis transformation, extra dims free; dsimplex: classifier fixed "
        "to a regular simplex (old and new models both); oca: orthogonal projection to the old "
        "space aligned with the old class prototypes, extra dims free (docs/methods.md)",
    )
    bct_lambda: float = Field(1.0, ge=0, description="weight of BCT's influence loss")
    compat: CompatLossConfig = CompatLossConfig()
    reports: int = Field(
        10,
        ge=1,
        description="report metrics + checkpoint about this many times per run (and after the "
        "last epoch): each report is a synchronisation point that costs seconds",
    )
    cache_max_bytes: int = Field(
        1 << 30,
        ge=0,
        description="decode the training split once and keep it in Ray's object store when "
        "it fits in this many bytes (else every epoch streams and decodes the shards again)",
    )


class ModelConfig(_Model):
    """One embedding model: trained here (uri unset) or brought from elsewhere (uri set)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    uri: str | None = Field(
        None,
        description="unset: train it; TorchScript or ONNX file; models:/NAME@ALIAS; carryover "
        "model dir",
    )
    use_gpu: bool = Field(
        False, description="ONNX: run on onnxruntime's CUDAExecutionProvider when installed"
    )
    allow_pickle: bool = Field(
        False, description="allow loading pickled mlflow.pytorch models (unsafe for untrusted ones)"
    )
    architecture: ArchitectureConfig = ArchitectureConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _simplex_fits(self) -> ModelConfig:
        """d-Simplex: K classes need K-1 embedding dims for the simplex's vertices."""
        a = self.architecture
        if self.train.loss == "dsimplex" and a.embedding_dim < a.num_classes - 1:
            raise ValueError(
                f"train.loss=dsimplex needs architecture.embedding_dim >= num_classes - 1 = "
                f"{a.num_classes - 1}, got {a.embedding_dim}"
            )
        return self


class SideInfoConfig(ModelConfig):
    """FCT's side-information model: a small SimCLR-style contrastive model, low output dim.

    Trained on the data the old model saw (train.classes unset = the old model's classes);
    its output is stored as `side_info` next to each old embedding at ingest.
    """

    name: str = Field("side-info", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    enabled: bool = True
    preprocess: PreprocessConfig | None = Field(
        None,
        description="unset: the old model's (one decode feeds both at ingest); set it to a "
        "lower input_size for cheap side-info (the images are then decoded for it too)",
    )
    architecture: ArchitectureConfig = ArchitectureConfig(
        widths=[16, 32, 64], embedding_dim=32, num_classes=2
    )
    train: TrainConfig = TrainConfig(epochs=30, batch_size=256, lr=2e-3, weight_decay=1e-5)
    temperature: float = Field(0.2, gt=0, description="NT-Xent temperature")
    proj_dim: int = Field(64, ge=2, description="projection head output (training only)")
    augment_strength: float = Field(1.0, ge=0, le=2)


class TransformationConfig(_Model):
    """FCT transformation h(old, side) → new; with FastFill's uncertainty head by default."""

    name: str = Field("fct", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    enabled: bool = True
    direct: bool = Field(
        True,
        description="when the gallery serves a model older than old_model, also train h from "
        "that model straight to the new one; evaluate measures it against the registered "
        "maps composed, and the upgrade maps with the better (one map is cheaper to apply)",
    )
    side_info: bool = Field(True, description="use side-info when the old version stores it")
    loss: Literal["fct", "fastfill"] = Field(
        "fastfill", description="fct: L2 to the new embedding; fastfill: + uncertainty head"
    )
    inner_dim: int | None = Field(
        None,
        ge=2,
        description="mixer width; unset: FCT's 16 × new dim, narrowed to fit max_mflops",
    )
    max_mflops: float | None = Field(
        64.0,
        gt=0,
        description="cost limit of h per row in MFLOP (2 × multiply-adds); sizes an unset "
        "inner_dim (FCT's width at 1,280-d is ~1,100 MFLOP, a mobile CNN's forward ~400-800)",
    )
    linear_skip: bool | None = Field(
        None,
        description="h = closed-form ridge map old→new + a learned residual; unset: on at "
        "production dimensions (old or new >= 256), off at FCT's own (128-d)",
    )
    fit_classifier: bool = Field(
        False,
        description="FastFill without the new model's own head: fit a linear one on the "
        "labelled training pairs for the CE term (off: the regression term alone; a fitted "
        "probe cost 5 points of recall@10 on the real 1,280-d benchmark)",
    )
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    augment_copies: int = Field(
        0, ge=0, description="extra augmented views of each training image (FCT trains online)"
    )
    max_train_rows: int | None = Field(
        200_000, ge=1, description="cap on (old, side, new) training rows (a sample suffices)"
    )
    train: TrainConfig = TrainConfig(epochs=60, batch_size=256, lr=5e-4, weight_decay=3e-5)


class AdapterConfig(_Model):
    """Query adapters: map new-model queries into the old space (serve the old index at once)."""

    kinds: list[AdapterKind] = list(ADAPTER_KINDS)
    sample_rows: int = Field(5000, ge=10, description="paired (old, new) rows to fit on")
    rank: int | None = Field(None, ge=1, description="low_rank: default min(32, dims)")
    hidden: int = Field(256, ge=1, description="residual_mlp hidden width")
    epochs: int = Field(200, ge=1, description="residual_mlp training epochs")


class TrackingConfig(_Model):
    """MLflow: a local SQLite file by default, or an `mlflow server` URL."""

    uri: str | None = Field(None, description="default: sqlite:///<workdir>/mlflow.db")
    experiment: str = "carryover"
    artifact_location: str | None = Field(
        None, description="artifact root for a new experiment (default: <workdir>/mlartifacts)"
    )


class RayConfig(_Model):
    """Where to run: a local Ray (address unset) or a cluster address."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all)")
    submit_address: str | None = Field(
        None,
        description="Ray job submission address, http://HEAD:8265 (carryover submit / schedule; "
        "RAY_API_SERVER_ADDRESS also works); unset: jobs run here on a local Ray",
    )
    # A local Ray waits a fixed 30 s for its raylet; on a loaded machine that can time out.
    start_retries: int = Field(
        2, ge=0, description="retries of a Ray start-up (or connect) that failed"
    )
    start_backoff_seconds: float = Field(
        5.0, ge=0, description="wait before the first start-up retry; doubles at each retry"
    )
    storage_path: str | None = Field(
        None,
        description="Ray Train's checkpoints, shared by every node (s3:// on a cluster of "
        "several); default: <gallery>/_ray_results for an s3:// gallery, else "
        "<workdir>/ray_results",
    )


class EmbedConfig(_Model):
    """Ray Data embedding stage."""

    batch_size: int = Field(256, ge=1)
    num_actors: int = Field(1, ge=1)
    # Fractional CPUs: whole-CPU actors can deadlock a Ray Data pipeline on 2 cores.
    actor_num_cpus: float = Field(0.5, gt=0)
    decode_num_cpus: float = Field(0.5, gt=0)
    fuse_decode: bool = Field(
        False,
        description="decode inside the embed actors (no decoded pixels through the object "
        "store) instead of in separate tasks",
    )
    torch_threads: int = Field(1, ge=1)
    max_decoded_pixels: int = Field(
        64_000_000, ge=1, description="reject images larger than this (decompression bombs)"
    )
    probe_rows: int = Field(
        64,
        ge=2,
        description="rows of the gallery's own images each model embeds on the driver before a "
        "pass: a model that collapses, zeroes or NaNs them is refused before any Ray work",
    )
    max_rejected_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="stop a pass (and refuse a model on its probe) when more than this share "
        "of the rows read is rejected",
    )
    min_distinct_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="distinct embeddings per distinct image, at least: fewer means the model "
        "maps different images to one vector (checked on the probe and before promote)",
    )


class IndexConfig(_Model):
    """faiss index per gallery version."""

    metric: Literal["cosine", "l2"] = "cosine"
    kind: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    flat_max_rows: int = Field(200_000, ge=1, description="auto: flat index up to this size")


class EvalConfig(_Model):
    """Retrieval evaluation on the labelled validation split (FCT protocol)."""

    max_queries: int = Field(10_000, ge=10, description="cap on validation rows (seeded sample)")
    metric: Literal["cosine", "l2"] = "cosine"
    min_top1_drop_tolerance: float = Field(
        2.0, ge=0, description="validation: allowed top-1 shortfall vs the estimate, in points"
    )
    orderings: list[Literal["random", "uncertainty", "oracle"]] = [
        "random",
        "uncertainty",
        "oracle",
    ]
    curve_steps: int = Field(21, ge=1, description="backfilling curve: steps+1 points, 0..100%")
    recall_k: int = Field(
        10,
        ge=1,
        description="label-free quality: recall@k of a gallery against the new model's own k "
        "nearest neighbours on the sample (the measure of an unlabelled gallery)",
    )
    report_dir: str | None = Field(None, description="default: <workdir>/reports/<name>")


class PlanConfig(_Model):
    """The per-shard upgrade plan: budget, quality target, the rules' thresholds, execution."""

    target_version: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="the gallery version to build (default: new_model.name)",
    )
    budget_fraction: float | None = Field(
        0.25, ge=0, le=1, description="images to re-embed, as a fraction of the gallery's rows"
    )
    budget_images: int | None = Field(None, ge=0, description="images to re-embed (absolute)")
    budget_seconds: float | None = Field(
        None, ge=0, description="compute seconds to spend re-embedding (measured throughputs)"
    )
    target_top1: float | None = Field(
        None, ge=0, le=100, description="stop spending once the estimated top-1 reaches this"
    )
    target_recall: float | None = Field(
        None,
        ge=0,
        le=100,
        description="unlabelled gallery: stop spending once the estimated recall@k (of the new "
        "model's own neighbours, evaluate.recall_k) reaches this",
    )
    min_gain: float = Field(
        0.5,
        ge=0,
        description="re-embed only what must be when a full backfill would gain less top-1 "
        "(points) than this over the transformation: re-embedding would not pay",
    )
    full_threshold: float = Field(
        0.7, gt=0, le=1, description="re-embed a whole shard once this fraction of it is chosen"
    )
    min_partial_fraction: float = Field(
        0.01, ge=0, lt=1, description="below this fraction a shard is only transformed"
    )
    no_side_info: Literal["transform", "backfill"] = Field(
        "transform",
        description="shards without side-info: a side-info-free transformation, or full backfill",
    )
    max_chain_length: int | None = Field(
        3,
        ge=1,
        description="most maps a row may go through since it was embedded from its image; rows "
        "an upgrade would map further are re-embedded first, and the budget must hold them "
        "(null: no limit)",
    )
    quantiles: int = Field(101, ge=3, le=10_001, description="uncertainty summary per shard")
    embed_rows_per_second: float | None = Field(
        None, gt=0, description="cost model: decode+embed rows/s (default: measured at ingest)"
    )
    scan_rows_per_second: float = Field(
        20_000, gt=0, description="cost model: rows/s to scan an image shard for chosen keys"
    )
    transform_rows_per_second: float | None = Field(
        None, gt=0, description="cost model: rows/s of applying h (default: the profile's)"
    )
    measure_rows: int = Field(
        256,
        ge=0,
        description="price with this upgrade's own models: time the new model on this many "
        "gallery images and h on 8x as many stored rows before planning (0: do not measure)",
    )
    when_backfill_cheaper: Literal["warn", "backfill"] = Field(
        "warn",
        description="the upgrade's first estimate finds re-embedding every image cheaper than "
        "training and applying h: warn, or backfill (train no side-info model and no h)",
    )
    min_transform_speedup: float = Field(
        2.0,
        gt=0,
        description="transform only when h is at least this many times faster per row than "
        "the new model; else every shard with images is re-embedded",
    )
    throughput_profile: str | None = Field(
        None,
        description="measured throughputs (JSON from `make bench` / jobs/benchmark.py --profile): "
        "images/s of embedding and rows/s of transforming, which price transform vs backfill",
    )
    parallel_shards: int = Field(2, ge=1, description="shards executed at once (actor pool)")
    retries: int = Field(2, ge=0, description="re-runs of a shard after a transient failure")


class ScheduleConfig(_Model):
    """Nightly upgrades: when to look, which registry aliases to compare, the gallery lock."""

    cron: str = Field("0 2 * * *", description="when `carryover schedule` ticks (5-field cron)")
    candidate_alias: str = "candidate"
    serving_alias: str = "serving"
    job: str = Field("upgrade", pattern=r"^[a-z_]+$", description="the jobs/ entrypoint to submit")
    lock_ttl_seconds: float = Field(
        900, ge=10, description="gallery lock lease; renewed every third of it while held"
    )
    poll_seconds: float = Field(5, gt=0, description="job status polling while a tick waits")
    misfire_grace_seconds: float = Field(
        300, ge=0, description="a tick starting later than this after its time counts as missed"
    )

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        if len(v.split()) != 5 or not croniter.is_valid(v):
            raise ValueError(
                f"{v!r} is not a 5-field cron expression (minute hour day month weekday), "
                "e.g. '0 2 * * *' for 02:00 every day"
            )
        return v


class AdoptConfig(_Model):
    """`carryover import`: how existing embedding files map onto a gallery version."""

    layout: Literal["auto", "parquet", "npy"] = Field(
        "auto",
        description="parquet: files with a key and an embedding column; npy: clip-retrieval's "
        "img_emb/img_emb_N.npy beside metadata/metadata_N.parquet; auto: npy when an img_emb "
        "folder is there",
    )
    key_column: str | None = Field(
        None, description="column of the row's key (default: key; npy layout: image_path)"
    )
    embedding_column: str = Field("embedding", description="Parquet layout: the vectors' column")
    image_column: str | None = Field(
        None, description="column with each row's image path or URL, recorded for backfills"
    )
    max_shard_rows: int = Field(
        1_000_000, ge=1, description="rows per gallery shard (an input file splits beyond)"
    )
    batch_rows: int = Field(65_536, ge=1, description="rows read at once (bounds memory)")

    def key(self, layout: str) -> str:
        """The key column for a layout."""
        return self.key_column or ("image_path" if layout == "npy" else "key")


class ServeConfig(_Model):
    """`carryover serve`: the search service on Ray Serve (HTTP/JSON)."""

    host: str = Field("127.0.0.1", description="address the HTTP proxy binds (0.0.0.0: all)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the service")
    replicas: int = Field(1, ge=1, description="replicas, each holding the model and the index")
    replica_num_cpus: float = Field(0.5, gt=0, description="CPUs each replica reserves")
    poll_seconds: float = Field(
        2.0,
        gt=0,
        description="how often each replica reads CURRENT; after a promote or rollback it "
        "loads the new version fully, then swaps it in (requests never wait for the load)",
    )
    top_k: int = Field(10, ge=1, description="neighbours returned when a query gives no k")
    max_k: int = Field(1000, ge=1, description="largest k a query may ask for")
    max_image_bytes: int = Field(
        20_000_000, ge=1, description="largest image upload accepted (HTTP 413 above)"
    )
    ready_timeout_seconds: float = Field(
        300.0, gt=0, description="how long the command waits for every replica to be ready"
    )


class ImageColumnsConfig(_Model):
    """Which column of the image shards holds each field (None: the layout's default)."""

    key: str | None = Field(None, description="unique row key (default: key)")
    image: str | None = Field(
        None, description="encoded image bytes (default: image; jpg for img2dataset)"
    )
    label: str | None = Field(
        None,
        description="integer class label; optional unless set (default: label; img2dataset: none)",
    )
    split: str | None = Field(
        None,
        description="'train'/'val'; optional unless set: without one, a row's split comes from a "
        "hash of its key (data.val_fraction, data.seed), as `data prepare` writes it",
    )


class ImageSourceConfig(_Model):
    """How image shards are laid out: carryover's own, or img2dataset's output read in place."""

    layout: Literal["carryover", "img2dataset"] = Field(
        "carryover",
        description="carryover: shard-NNNNN.parquet with key/image/label/split; img2dataset: "
        "NNNNN.parquet with key, jpg and status/error_message (failed rows become rejected rows)",
    )
    shard_pattern: str | None = Field(
        None,
        description="glob of shard file names; the shard id is the last number in the name "
        "(default: shard-*.parquet; [0-9]*.parquet for img2dataset)",
    )
    columns: ImageColumnsConfig = ImageColumnsConfig()
    status_column: str | None = Field(
        None,
        description="rows whose value is not 'success' are rejected, not decoded "
        "(default: none; status for img2dataset, optional unless set)",
    )
    error_column: str | None = Field(
        None,
        description="the reason recorded for a row the status column rejects "
        "(default: none; error_message for img2dataset)",
    )


class ProgressConfig(_Model):
    """What a running upgrade shows: progress records for `carryover status`, the log file."""

    write_interval_seconds: float = Field(
        1.0, gt=0, description="a progress record is rewritten at most this often"
    )
    train_poll_seconds: float = Field(
        0.5, gt=0, description="how often the driver reads the training workers' progress"
    )
    recent_upgrades: int = Field(5, ge=0, description="finished upgrades `carryover status` lists")
    log_file: str | None = Field(
        None,
        description="Ray's and MLflow's log lines go here, never to the terminal "
        "(default: <workdir>/logs/carryover.log)",
    )


class DataConfig(_Model):
    """Image shards: how they are laid out and read, and the train/val split of rows."""

    val_fraction: float = Field(0.3, gt=0, lt=1)
    seed: int = 0
    source: ImageSourceConfig = ImageSourceConfig()


class PublishConfig(_Model):
    """`carryover publish`: copies of gallery versions in vector databases (LanceDB), their ANN
    index, and the tag that serving readers open (moved by promote and rollback)."""

    table: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="table name in the target database (default: gallery_name)",
    )
    serving_tag: str = Field(
        "serving",
        pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$",
        description="tag on the table version that serving readers open; promote/rollback move it",
    )
    index_type: Literal["IVF_PQ", "IVF_FLAT", "none"] = Field(
        "IVF_FLAT",
        description="ANN index built after each publish (IVF_FLAT: exact distances in the probed "
        "partitions, recall reaches the target; IVF_PQ: smaller, lossy; none: exact scans only)",
    )
    min_rows_for_index: int = Field(
        256,
        ge=256,
        description="below this many rows no ANN index is built (a scan is exact and fast; "
        "PQ needs 256 rows to train its codebooks)",
    )
    rows_per_partition: int = Field(
        4096, ge=256, description="IVF partitions = ceil(rows / this) (Lance samples 256 a list)"
    )
    sub_vector_dims: int = Field(
        8, ge=1, description="IVF_PQ: dimensions per PQ sub-vector (sub-vectors = dim / this)"
    )
    refine_factor: int = Field(
        10, ge=1, description="IVF_PQ: re-rank refine_factor*k PQ candidates by exact distance"
    )
    target_recall: float = Field(
        0.95, gt=0, le=1, description="nprobes is tuned until recall@10 vs exact reaches this"
    )
    tune_queries: int = Field(
        200, ge=1, description="sample queries (rows of the table) for the nprobes tuning"
    )
    max_rows_per_file: int = Field(
        1_048_576, ge=1, description="rows per Lance data file a write task starts a new file at"
    )
    read_rows: int = Field(
        65_536, ge=1, description="rows per block read from a gallery shard (bounds memory)"
    )
    auto_publish: bool = Field(
        True,
        description="promote/rollback to a version a target lacks publishes it there first "
        "(false: refuse, nothing moves)",
    )


def _compatible_losses(old: ModelConfig, new: ModelConfig) -> None:
    """Loss pairs that cannot give compatible models are refused: an old model trained here
    has no older model to be compatible with; d-Simplex needs both models on one simplex."""
    if old.uri is None and old.train.loss in ("bct", "bt2", "oca"):
        raise ValueError(
            f"old_model.train.loss={old.train.loss} needs an older model; the old model trains "
            "with independent or dsimplex"
        )
    if new.train.loss != "dsimplex" or old.uri is not None:
        return  # a brought old model: docs/methods.md says it must be a d-Simplex one
    if old.train.loss != "dsimplex":
        raise ValueError(
            "new_model.train.loss=dsimplex needs old_model.train.loss=dsimplex: only two models "
            "trained on the same fixed simplex are compatible"
        )
    oa, na = old.architecture, new.architecture
    if (oa.num_classes, oa.embedding_dim) != (na.num_classes, na.embedding_dim):
        raise ValueError(
            "dsimplex: old_model and new_model need the same architecture.num_classes and "
            f"embedding_dim (one simplex); got ({oa.num_classes}, {oa.embedding_dim}) and "
            f"({na.num_classes}, {na.embedding_dim})"
        )


class UpgradeConfig(_Model):
    """Everything one gallery upgrade needs; load with `load_config`."""

    gallery_name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    workdir: str = ".carryover"
    gallery: str | None = Field(None, description="gallery URI (default: <workdir>/gallery)")
    images: str | None = Field(None, description="image shards URI (default: <workdir>/images)")
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    old_model: ModelConfig = ModelConfig(
        name="v1",
        architecture=ArchitectureConfig(widths=[8, 16, 32], embedding_dim=32),
        train=TrainConfig(classes=[0, 1, 2, 3, 4]),
    )
    new_model: ModelConfig = ModelConfig(name="v2")
    side_info: SideInfoConfig = SideInfoConfig()
    transformation: TransformationConfig = TransformationConfig()
    adapters: AdapterConfig = AdapterConfig()
    embed: EmbedConfig = EmbedConfig()
    index: IndexConfig = IndexConfig()
    evaluate: EvalConfig = EvalConfig()
    plan: PlanConfig = PlanConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    adopt: AdoptConfig = AdoptConfig()
    serve: ServeConfig = ServeConfig()
    publish: PublishConfig = PublishConfig()
    progress: ProgressConfig = ProgressConfig()

    @model_validator(mode="after")
    def _possible(self) -> UpgradeConfig:
        """Combinations that cannot work are refused when the config loads, before any work."""
        old = self.old_model
        if old.name == self.new_model.name:
            raise ValueError(f"old_model.name and new_model.name are both {old.name!r}")
        if self.plan.when_backfill_cheaper == "backfill" and self.plan.measure_rows == 0:
            raise ValueError(
                "plan.when_backfill_cheaper=backfill needs the estimate: plan.measure_rows > 0"
            )
        _compatible_losses(old, self.new_model)
        if self.evaluate.recall_k >= self.evaluate.max_queries:
            raise ValueError(
                f"evaluate.recall_k={self.evaluate.recall_k} must be below "
                f"evaluate.max_queries={self.evaluate.max_queries}"
            )
        return self

    @property
    def side_info_model(self) -> SideInfoConfig:
        """The side-info model config with its preprocess resolved (default: the old model's)."""
        sc = self.side_info
        if sc.preprocess is not None:
            return sc
        return sc.model_copy(update={"preprocess": self.old_model.preprocess})

    @property
    def target_version(self) -> str:
        """The gallery version an upgrade builds."""
        return self.plan.target_version or self.new_model.name

    @property
    def gallery_uri(self) -> str:
        return self.gallery or str(Path(self.workdir) / "gallery")

    @property
    def log_path(self) -> Path:
        return Path(self.progress.log_file or Path(self.workdir) / "logs" / "carryover.log")

    @property
    def images_uri(self) -> str:
        return self.images or str(Path(self.workdir) / "images")

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{Path(self.workdir).resolve() / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str:
        return self.tracking.artifact_location or str(Path(self.workdir).resolve() / "mlartifacts")


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "combination"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if not e["loc"]:  # a combination of keys: the message names them
            msg = msg.removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {override!r}: expected KEY=VALUE, e.g. new_model.train.epochs=3"
        )
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {e}") from e


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def config_from_dict(data: dict[str, Any], origin: str = "<dict>") -> UpgradeConfig:
    """Validate a plain dict over the defaults; errors name each offending key path."""
    # Merge onto the full defaults so a partial section (old_model: {train: ...}) keeps the
    # section's own defaults (its name, architecture, class subset) instead of dropping them.
    try:
        cfg = UpgradeConfig.model_validate(_deep_merge(UpgradeConfig().model_dump(), data))
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None
    _mark_given(cfg, data)
    _drop_training_of_brought(cfg, origin)
    return cfg


def _mark_given(model: BaseModel, given: Any) -> None:
    """Make model_fields_set say what the user wrote: the defaults merged under it above
    (a whole dump of UpgradeConfig()) were not set by anybody."""
    raw = given if isinstance(given, dict) else {}
    fields = type(model).model_fields
    object.__setattr__(model, "__pydantic_fields_set__", {k for k in raw if k in fields})
    for name in fields:
        child = getattr(model, name)
        if isinstance(child, BaseModel):
            _mark_given(child, raw.get(name))


BROUGHT_SECTIONS = ("old_model", "new_model", "side_info")


def _drop_training_of_brought(cfg: UpgradeConfig, origin: str) -> None:
    """A model with a uri is brought, never trained here: training keys given for it are a
    mistake, and the defaults (the digits demo's old_model.train.classes) do not apply."""
    for section in BROUGHT_SECTIONS:
        model = getattr(cfg, section)
        if model.uri is None:
            continue
        given = sorted(model.train.model_fields_set)
        if given:
            raise ConfigError(
                f"{origin}: {section}.train.{given[0]} is set, but {section}.uri brings the "
                f"model ({model.uri}), which is not trained here: remove {section}.train"
            )
        model.train = type(model).model_fields["train"].default.model_copy()
        model.__pydantic_fields_set__.discard("train")
        object.__setattr__(model.train, "__pydantic_fields_set__", set())


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> UpgradeConfig:
    """Load YAML (optional) and apply `key=value` overrides, then validate."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:  # permissions, a binary file
            raise ConfigError(f"cannot read config file {p}: {e}") from None
        try:
            loaded = _load_yaml(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"malformed YAML in {p}: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for ov in overrides or []:
        apply_override(data, ov)
    if overrides:
        origin += " + overrides"
    return config_from_dict(data, origin)


def dump_config(cfg: UpgradeConfig) -> dict[str, Any]:
    """A JSON-safe dict of the config with secrets masked (safe for logs and MLflow params)."""
    return cfg.model_dump(mode="json")
