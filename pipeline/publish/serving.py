"""Publish a version to a target, and move every recorded target's serving name together with
CURRENT and the registry alias on promote / rollback: all of them move, or none stays moved."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.config import ConfigError, UpgradeConfig
from pipeline.gallery.store import Gallery, GalleryError
from pipeline.io.redact import redact_text
from pipeline.publish.lancedb import open_lancedb
from pipeline.publish.target import (
    Published,
    Target,
    TargetInfo,
    TargetURI,
    parse_target,
    read_records,
    record_published,
)

OPENERS = {"lancedb": open_lancedb}  # a new kind: its module's opener here and in KINDS


@dataclass(frozen=True)
class PublishResult:
    """`carryover publish`: what was written, and the target's state afterwards."""

    published: Published
    info: TargetInfo
    serving_moved: bool


def open_target(uri: TargetURI, g: Gallery, cfg: UpgradeConfig) -> Target:
    return OPENERS[uri.kind](uri, g, cfg)


def publish_version(cfg: UpgradeConfig, g: Gallery, version: str, to: str) -> PublishResult:
    """Publish `version` to `to`, record it in GALLERY/targets.json; when the version is the
    serving one, point the target's serving name at it too (else it stays where it was)."""
    uri = parse_target(to)
    if not g.has_version(version):
        have = ", ".join(g.versions()) or "none"
        raise ConfigError(f"{g.uri}: no complete version {version!r} (versions: {have})")
    target = open_target(uri, g, cfg)
    published = target.publish(version)
    record_published(g, published, uri.kind)
    moved = g.current() == version
    if moved:
        target.point(cfg.publish.serving_tag, version)
    return PublishResult(published, target.describe(), moved)


def recorded_targets(g: Gallery, cfg: UpgradeConfig) -> list[Target]:
    """The targets GALLERY/targets.json names, opened (a URI that no longer parses: an error)."""
    return [open_target(parse_target(u), g, cfg) for u in read_records(g)]


@contextmanager
def targets_moved(g: Gallery, cfg: UpgradeConfig, version: str, what: str) -> Iterator[None]:
    """Point every recorded target's serving name at `version` before the body moves CURRENT
    and the alias; if a target fails, the ones moved go back and nothing else moves; if the
    body fails, every target goes back."""
    tag = cfg.publish.serving_tag
    targets = recorded_targets(g, cfg)
    if not targets:
        yield
        return
    infos = [_ready(g, cfg, t, version, what) for t in targets]
    moved: list[tuple[Target, str | None]] = []
    try:
        for t, info in zip(targets, infos, strict=True):
            moved.append((t, info.serving))
            t.point(tag, version)
    except Exception as e:
        stuck = _put_back(moved, tag)
        why = redact_text((str(e).strip().splitlines() or [type(e).__name__])[0])
        left = f"; could not put back {tag} on {', '.join(stuck)}" if stuck else ""
        raise GalleryError(
            f"{what}: could not move {tag} on {moved[-1][0].uri} ({why}); CURRENT and the "
            f"alias did not move{left}"
        ) from None
    try:
        yield
    except BaseException:
        _put_back(moved, tag)
        raise


def _ready(g: Gallery, cfg: UpgradeConfig, t: Target, version: str, what: str) -> TargetInfo:
    """The target's state, once it holds `version` (published now when publish.auto_publish)."""
    info = t.describe()
    if version in info.versions:
        return info
    if not cfg.publish.auto_publish:
        raise GalleryError(
            f"{what}: {t.uri} holds no {version!r} (carryover publish {version} --to {t.uri}, "
            "or publish.auto_publish=true); nothing moved"
        )
    record_published(g, t.publish(version), t.uri.kind)
    return info


def _put_back(moved: list[tuple[Target, str | None]], tag: str) -> list[str]:
    """Each target's serving name where it was before, in reverse; the targets that refused."""
    stuck = []
    for t, before in reversed(moved):
        try:
            t.point(tag, before)
        except Exception:  # the caller's error names the first failure; these are listed
            stuck.append(str(t.uri))
    return stuck
