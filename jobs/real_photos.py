"""Real photographs found offline (Debian wallpaper packages, scikit-learn's samples), cut into
random crops written as class folders: one class per photograph, an instance-retrieval task."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Debian packages of photographs (see `make bench-real`): mate-backgrounds, ukui-wallpapers,
# gnome-backgrounds and sway-backgrounds under backgrounds/, plasma-workspace-wallpapers under
# wallpapers/ (one folder per picture, several sizes: the largest is kept).
PHOTO_DIRS = ("/usr/share/backgrounds", "/usr/share/wallpapers")
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
WORK_SIDE = 512  # photos are shrunk to this shorter side before cropping (some are 5K)


def find_photos(dirs: tuple[str, ...] = PHOTO_DIRS) -> list[Path]:
    """One file per distinct picture: the largest file of each plasma folder, every other file."""
    best: dict[str, Path] = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if not p.is_file() or p.suffix.lower() not in SUFFIXES:
                continue
            parts = p.relative_to(d).parts
            pic = f"{d}/{parts[0]}/{parts[2]}" if "contents" in parts else str(p)  # plasma
            pic = re.sub(r"[_-]\d+x\d+(\.\w+)$", r"\1", pic)  # one picture in several sizes
            if pic not in best or p.stat().st_size > best[pic].stat().st_size:
                best[pic] = p
    return [best[k] for k in sorted(best)]


def _open(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((WORK_SIDE * 4, WORK_SIDE * 4))
    except Exception:  # an unreadable or unsupported file is skipped, not fatal
        return None
    scale = WORK_SIDE / min(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    return im if min(im.size) >= 64 else None


def sample_photos() -> list[tuple[str, Image.Image]]:
    """scikit-learn's two sample photographs, each cut into 4 quadrants (8 pictures)."""
    from sklearn.datasets import load_sample_images  # start-up: scikit-learn takes ~1 s

    out = []
    for name, arr in zip(("china", "flower"), load_sample_images().images, strict=True):
        h, w = arr.shape[0] // 2, arr.shape[1] // 2
        for q, (y, x) in enumerate(((0, 0), (0, w), (h, 0), (h, w))):
            out.append((f"sklearn-{name}-{q}", Image.fromarray(arr[y : y + h, x : x + w])))
    return out


def crops(im: Image.Image, n: int, size: int, rng: np.random.Generator) -> list[bytes]:
    """n random crops (25-60% of the shorter side, random place, random mirror) as JPEG."""
    out = []
    for _ in range(n):
        side = int(min(im.size) * rng.uniform(0.25, 0.6))
        x = int(rng.integers(0, im.width - side + 1))
        y = int(rng.integers(0, im.height - side + 1))
        c = im.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            c = ImageOps.mirror(c)
        buf = io.BytesIO()
        c.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_crop_folders(out: Path, per_photo: int, size: int, quick: bool, seed: int = 0) -> dict:
    """Class folders out/<picture>/<n>.jpg; what was used."""
    rng = np.random.default_rng(seed)
    pictures = sample_photos()
    if not quick:
        found = find_photos()
        pictures += [(f"{i:03d}-{p.stem}", im) for i, p in enumerate(found) if (im := _open(p))]
    for name, im in pictures:
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for j, data in enumerate(crops(im, per_photo, size, rng)):
            (d / f"{j:03d}.jpg").write_bytes(data)
    return {
        "photos": len(pictures),
        "crops_per_photo": per_photo,
        "images": len(pictures) * per_photo,
    }
