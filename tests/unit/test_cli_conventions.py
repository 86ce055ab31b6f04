"""The CLI's conventions (docs/cli.md): every --help renders; read commands answer --json with
exactly one JSON object on one line; closed sets are choices --help lists (a wrong value exits
2 naming them); destructive commands refuse off a terminal without --yes; GALLERY is the last
positional (jobs list keeps a hidden --gallery); submit passes Ray's job options through;
`jobs logs -f` follows a local journalled job. A tiny gallery written with the Gallery API."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pytest
import typer
from typer.testing import CliRunner

from pipeline.choices import ADAPTER_KINDS, SHARD_ORDERS, TRAIN_TARGETS, UPGRADE_STAGES
from pipeline.cli import app
from pipeline.cli.common import emit_json
from pipeline.config import ConfigError
from pipeline.gallery.lock import GalleryLock, holder_of
from pipeline.gallery.store import Gallery, embedding_schema, embeddings_to_arrow
from pipeline.io import uri as uri_io
from pipeline.ops import jobs
from pipeline.ops.journal import Journal

WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}  # rich would fold choices at 80 columns
runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, list(args), env=WIDE)


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        path = (*prefix, name)
        out.append(path)
        if isinstance(cmd, click.Group):
            out.extend(_all_commands(cmd, path))
    return out


COMMANDS = _all_commands(typer.main.get_command(app))


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_help_renders(path: tuple[str, ...]) -> None:
    res = _invoke(*path, "--help")
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and path[-1] in res.output


def test_completion_is_on_and_completes_choices() -> None:
    top = _invoke("--help").output
    assert "--install-completion" in top and "--show-completion" in top
    env = {"_CARRYOVER_COMPLETE": "complete_bash", "COMP_CWORD": "3"}
    res = runner.invoke(
        app, [], prog_name="carryover", env={**env, "COMP_WORDS": "carryover upgrade --until "}
    )
    assert res.output.split() == list(UPGRADE_STAGES)


# -- one tiny gallery: v1 and v2 (serving), a journal entry --------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    g = Gallery(str(root / "gallery"))
    for v in ("v1", "v2"):
        keys = [f"{v}-{i}" for i in range(4)]
        emb = np.arange(16, dtype=np.float32).reshape(4, 4)
        t = pa.table(
            [pa.array(keys), embeddings_to_arrow(emb), pa.array(["embed:x"] * 4)],
            schema=embedding_schema(4),
        )
        uri_io.write_table(t, g.shard_uri(v, 0))
        g.commit_shard(v, {"shard_id": 0, "path": "shard-00000.parquet", "rows": 4})
        g.finalize(v, {"model": v})
        g.promote(v)
    journal = Journal(g.uri)
    journal.put({"id": "local-tiny-1", "kind": "job", "status": "SUCCEEDED", "created_at": 1.0})
    journal.write_log("local-tiny-1", "hello\n")
    return {"root": str(root), "gallery": g.uri}


def _one_json_line(res) -> dict:
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == 1, res.stdout
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


def test_read_commands_answer_one_json_line(tiny: dict[str, str]) -> None:
    g, wd = tiny["gallery"], ["--set", f"workdir={tiny['root']}"]
    versions = _one_json_line(_invoke("versions", g, "--json"))
    assert versions["serving"] == "v2" and sorted(versions["versions"]) == ["v1", "v2"]
    assert versions["versions"]["v1"]["rows"] == 4
    lock = _one_json_line(_invoke("lock", "show", g, "--json"))
    assert lock == {"gallery": g, "locked": False, "holder": None}
    listed = _one_json_line(_invoke("jobs", "list", g, "--json", *wd))
    assert "local-tiny-1" in [r["id"] for r in listed["jobs"]] and listed["gallery"] == g
    status = _one_json_line(_invoke("jobs", "status", "local-tiny-1", g, "--json", *wd))
    assert status["status"] == "SUCCEEDED"
    cfg = _one_json_line(_invoke("config", "--json", "--set", "gallery_name=shop"))
    assert cfg["gallery_name"] == "shop" and "storage" in cfg
    now = _one_json_line(_invoke("status", g, "--json", *wd))
    assert now["serving"] == "v2" and now["running"] is None
    targets = _one_json_line(_invoke("targets", g, "--json", *wd))
    assert targets == {"gallery": g, "current": "v2", "targets": []}


def test_hidden_gallery_alias_still_works(tiny: dict[str, str]) -> None:
    by_option = _invoke("jobs", "list", "--gallery", tiny["gallery"], "--json")
    assert _one_json_line(by_option)["gallery"] == tiny["gallery"]
    assert "deprecated" in by_option.stderr
    assert "--gallery" not in _invoke("jobs", "list", "--help").output
    clash = _invoke("jobs", "list", tiny["gallery"], "--gallery", "/elsewhere")
    assert clash.exit_code == 2 and "disagree" in clash.stderr


def test_lock_show_json_names_the_holder_and_exits_3(tiny: dict[str, str]) -> None:
    lock = GalleryLock(tiny["gallery"], owner="tester", purpose="test")
    lock.acquire()
    try:
        res = _invoke("lock", "show", tiny["gallery"], "--json")
    finally:
        lock.release()
    assert res.exit_code == 3
    obj = json.loads(res.stdout)
    assert obj["locked"] and obj["holder"]["owner"] == "tester" and "token" not in obj["holder"]


def test_emit_json_is_strict_one_line(capsys: pytest.CaptureFixture) -> None:
    emit_json({"a": float("nan"), "b": [1.5, float("inf")], "p": Path("/x")})
    out = capsys.readouterr().out
    assert out == '{"a": null, "b": [1.5, null], "p": "/x"}\n'


# -- choices --------------------------------------------------------------------------------
CHOICES = {
    ("upgrade", "--until"): UPGRADE_STAGES,
    ("train", "--which"): TRAIN_TARGETS,
    ("search", "--adapter"): ADAPTER_KINDS,
    ("data prepare", "--order"): SHARD_ORDERS,
}


@pytest.mark.parametrize("where", sorted(CHOICES), ids=" ".join)
def test_choices_are_listed_and_a_wrong_value_exits_2(where: tuple[str, str]) -> None:
    command, option = where
    values = CHOICES[where]
    assert "|".join(values) in _invoke(*command.split(), "--help").output
    res = _invoke(*command.split(), option, "nope")
    assert res.exit_code == 2
    assert all(v in res.output for v in values) and "nope" in res.output


def test_upgrade_stages_are_the_graphs_stages() -> None:
    """upgrade_graph names its stages in Stage("...") calls: the same list, in order."""
    src = (Path(__file__).parents[2] / "pipeline" / "upgrade_graph.py").read_text()
    names = [
        n.args[0].value
        for n in ast.walk(ast.parse(src))
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Stage"
    ]
    assert names == list(UPGRADE_STAGES)


# -- destructive commands -------------------------------------------------------------------
def test_destructive_commands_refuse_off_a_terminal_without_yes(tiny: dict[str, str]) -> None:
    g = tiny["gallery"]
    current = (Path(g) / "CURRENT").read_bytes()
    lock = GalleryLock(g, owner="tester", purpose="test")
    lock.acquire()
    try:
        for args in (
            ["rollback", g],
            ["lock", "break", g],
            ["upgrade", "--restart", "--set", f"gallery={g}"],
            ["data", "prepare", "--source", "synthetic", "--out", str(Path(g) / "versions/v1")],
        ):
            res = _invoke(*args)
            assert res.exit_code == 2, (args, res.output)
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and "pass --yes" in lines[0], res.stderr
        assert holder_of(g).owner == "tester"  # nothing was done
        assert (Path(g) / "CURRENT").read_bytes() == current
        assert sorted(p.name for p in (Path(g) / "versions/v1").glob("shard-*")) == [
            "shard-00000.parquet"
        ]
        broken = _one_json_line(_invoke("lock", "break", g, "--yes", "--json"))
    finally:
        lock.release()
    assert broken["removed"] and broken["holder"]["owner"] == "tester"
    assert holder_of(g) is None


# -- submit's pass-through ------------------------------------------------------------------
def test_submit_kwargs_pass_ray_options_through(tmp_path: Path) -> None:
    env_file = tmp_path / "env.yaml"
    env_file.write_text("pip: [requests]\nenv_vars: {A: '1', CARRYOVER_JOB_ID: theirs}\n")
    opts = jobs.JobOptions(
        runtime_env=jobs.load_runtime_env(env_file, '{"env_vars": {"B": "2"}, "conda": "x"}'),
        num_cpus=0.5,
        num_gpus=1,
        memory=2**30,
        resources=jobs.parse_resources('{"accelerator_type:H100": 1}'),
    )
    ours = {"CARRYOVER_JOB_ID": "sid", "PYTHONUNBUFFERED": "1"}
    kw = jobs.submit_kwargs("python jobs/upgrade.py", "sid", tmp_path, ours, {"m": "1"}, opts)
    assert kw["runtime_env"] == {
        "pip": ["requests"],  # the file's keys, JSON's conda added, its env_vars replaced
        "conda": "x",
        "working_dir": str(tmp_path),
        "env_vars": {"B": "2", "CARRYOVER_JOB_ID": "sid", "PYTHONUNBUFFERED": "1"},
    }
    assert kw["entrypoint_num_cpus"] == 0.5 and kw["entrypoint_num_gpus"] == 1
    assert kw["entrypoint_memory"] == 2**30
    assert kw["entrypoint_resources"] == {"accelerator_type:H100": 1.0}
    assert kw["submission_id"] == "sid" and kw["metadata"] == {"m": "1"}
    plain = jobs.submit_kwargs("ep", "sid", tmp_path, ours, {}, None)
    assert not any(k.startswith("entrypoint_") for k in plain)  # Ray's defaults stay
    with pytest.raises(ConfigError, match="working_dir"):
        jobs.submit_kwargs("ep", "sid", tmp_path, ours, {}, jobs.JobOptions({"working_dir": "."}))
    with pytest.raises(ConfigError, match="--entrypoint-resources"):
        jobs.parse_resources('{"GPU": "one"}')


def test_submit_options_are_checked_before_anything_runs(tmp_path: Path) -> None:
    flags = ["--set", f"workdir={tmp_path}"]
    bad = _invoke("submit", "--runtime-env-json", "[1]", *flags)
    assert bad.exit_code == 2 and "--runtime-env-json: expected a JSON object" in bad.stderr
    missing = _invoke("submit", "--runtime-env", str(tmp_path / "none.yaml"), *flags)
    assert missing.exit_code == 2 and "none.yaml" in missing.stderr
    local = _invoke("submit", "--entrypoint-num-gpus", "1", *flags)
    assert local.exit_code == 2 and "give --address" in local.stderr
    assert not (tmp_path / "gallery").exists()


# -- jobs logs -f ---------------------------------------------------------------------------
def test_follow_local_streams_a_growing_log_until_the_job_ends(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "g"))
    journal.put({"id": "local-f-1", "kind": "job", "status": "RUNNING"})
    journal.write_log("local-f-1", "one\n")
    chunks: list[str] = []
    seen_one = threading.Event()

    def echo(c: str) -> None:
        chunks.append(c)
        seen_one.set()

    result: dict = {}
    t = threading.Thread(
        target=lambda: result.update(jobs.follow_local("local-f-1", journal, echo, poll=0.05))
    )
    t.start()
    assert seen_one.wait(30)
    journal.write_log("local-f-1", "one\ntwo\n")
    journal.update("local-f-1", status="FAILED")
    t.join(30)
    assert not t.is_alive() and result["status"] == "FAILED"
    assert "".join(chunks) == "one\ntwo\n"


def test_follow_local_ends_when_the_jobs_process_is_gone(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    journal = Journal(str(tmp_path / "g"))
    host = jobs.socket.gethostname()
    journal.put({"id": "local-d-1", "kind": "job", "status": "RUNNING", "host": host})
    journal.update("local-d-1", pid=dead.pid)
    rec = jobs.follow_local("local-d-1", journal, lambda c: None, poll=0.05)
    assert rec["status"] == "FAILED" and "gone" in rec["message"]


def test_jobs_logs_follow_exit_code_says_how_the_job_ended(tiny: dict[str, str]) -> None:
    res = _invoke("jobs", "logs", "local-tiny-1", tiny["gallery"], "-f")
    assert res.exit_code == 0 and res.stdout == "hello\n"
    Journal(tiny["gallery"]).put({"id": "local-tiny-2", "kind": "job", "status": "FAILED"})
    failed = _invoke("jobs", "logs", "local-tiny-2", tiny["gallery"], "--follow")
    assert failed.exit_code == 1 and "FAILED" in failed.stderr
