"""A gallery's identity as its manifests record it: its name and its MLflow registry.

Commands on a GALLERY take these from the gallery itself, so a rollback moves the `serving`
alias of the model that serves it, whatever config (or none) the command was given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.config import ConfigError, UpgradeConfig
from pipeline.gallery.lock import LOCK_FILE
from pipeline.gallery.store import CURRENT, MANIFEST, VERSION_PATTERN, Gallery, check_name
from pipeline.io import uri as uri_io
from pipeline.io.redact import MASK, redact_text

EMBEDDER = "embedder"
GALLERY_NAME, TRACKING = "gallery_name", "tracking"  # the identity keys a user may give


@dataclass
class GalleryIdentity:
    """Name, tracking URI (credentials masked) and registered embedder of a gallery."""

    name: str
    tracking_uri: str | None  # None: written before the manifest recorded it
    registry_model: str | None

    @classmethod
    def of_config(cls, cfg: UpgradeConfig) -> GalleryIdentity:
        """The identity a version written under `cfg` records."""
        name = cfg.gallery_name
        return cls(name, redact_text(cfg.tracking_uri), f"{name}-{EMBEDDER}")

    def manifest_fields(self) -> dict[str, str | None]:
        """The keys every manifest carries (a manifest is JSON: the one place for a dict)."""
        return {
            "gallery": self.name,
            "tracking_uri": self.tracking_uri,
            "registry_model": self.registry_model,
        }


def gallery_exists(g: Gallery) -> bool:
    """A gallery is here: a CURRENT pointer, a complete version, or a lease being held on it
    (its first upgrade is running). Only reads: nothing is created where there is none."""
    for name in (CURRENT, LOCK_FILE):
        if uri_io.is_file(g.path(name), g.storage):
            return True
    versions = uri_io.list_dir(g.path("versions"), g.storage)
    return any(
        uri_io.is_file(uri_io.join(g.path("versions"), v, MANIFEST), g.storage)
        for v in versions
        if re.fullmatch(VERSION_PATTERN, v)
    )


def recorded_identity(g: Gallery) -> GalleryIdentity | None:
    """The identity in the serving version's manifest (else the newest), None if no manifest
    names its gallery."""
    names = g.versions()
    cur = g.current()
    for v in ([cur] if cur in names else []) + names[::-1]:
        m = g.manifest(v)
        if m.get("gallery"):  # it becomes the config's gallery_name: a plain name or nothing
            name = check_name(m["gallery"], f"{g.path('versions', v, MANIFEST)}: gallery")
            return GalleryIdentity(name, m.get("tracking_uri"), m.get("registry_model"))
    return None


def given_keys(from_file: bool, sets: list[str] | None) -> frozenset[str]:
    """The identity keys the user gave: both with a -c config (its defaults are its own
    values), else those a --set names (workdir decides the default tracking URI)."""
    if from_file:
        return frozenset({GALLERY_NAME, TRACKING})
    keys = {s.partition("=")[0].strip() for s in sets or []}
    given = {GALLERY_NAME} if GALLERY_NAME in keys else set()
    if keys & {"workdir", "tracking", "tracking.uri"}:
        given.add(TRACKING)
    return frozenset(given)


def adopt_identity(
    cfg: UpgradeConfig,
    given: frozenset[str] = frozenset(),
    require: bool = True,
    uses_tracking: bool = True,
) -> GalleryIdentity | None:
    """Point `cfg` at the gallery's own name and tracking URI.

    A `given` key (see `given_keys`) that disagrees with the gallery is a ConfigError naming
    both; a missing gallery is FileNotFoundError when `require`. Galleries written before the
    tracking URI was recorded keep the config's. Returns the identity read (None: none)."""
    g = Gallery(cfg.gallery_uri, cfg.storage)
    if not gallery_exists(g):
        if require:
            raise FileNotFoundError(f"no gallery at {g.uri}")
        return None
    ident = recorded_identity(g)
    if ident is None:
        return None
    if GALLERY_NAME in given and cfg.gallery_name != ident.name:
        raise ConfigError(
            f"gallery_name {cfg.gallery_name!r} (config) disagrees with gallery {g.uri}, "
            f"whose manifests name it {ident.name!r}"
        )
    cfg.gallery_name = ident.name
    if ident.tracking_uri is not None:
        _adopt_tracking(cfg, g.uri, ident.tracking_uri, TRACKING in given, uses_tracking)
    return ident


def _adopt_tracking(
    cfg: UpgradeConfig, where: str, recorded: str, explicit: bool, uses_tracking: bool
) -> None:
    """Take the recorded tracking URI unless the user gave another (then refuse)."""
    ours = redact_text(cfg.tracking_uri)
    if ours == recorded:
        return  # the config's own value: it may hold the credentials the manifest masks
    if explicit:
        raise ConfigError(
            f"tracking URI {ours} (config) disagrees with gallery {where}, whose models are "
            f"registered at {recorded}"
        )
    if MASK not in recorded:
        cfg.tracking.uri = recorded
    elif uses_tracking:
        raise ConfigError(
            f"gallery {where} registers its models at {recorded} (credentials masked): give "
            "that URI with --set tracking.uri=... or in the -c config"
        )
