"""Uploads: signature checks, safe zip extraction and the light check of a views dataset.

Everything here runs before a byte of a dataset reaches the pipeline, so it bounds what a request
can make the backend read, write or decode.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import zipfile
from pathlib import Path, PurePosixPath

from im3d.errors import Im3dError

UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")
ZIP_MAX_MEMBERS = 10_000
MAX_RATIO = 50  # most a member may expand (images compress little; text and JSON are small)
RATIO_FREE_BYTES = 1 << 20  # members smaller than this may expand more (JSON, tiny masks)
HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def regular_file_inside(root: Path, relative: str) -> Path | None:
    """`root/relative` if it is a regular file (not a symlink) whose real path stays inside `root`."""
    if not relative or "\\" in relative or "\0" in relative:
        return None
    parts = PurePosixPath(relative).parts
    if PurePosixPath(relative).is_absolute() or any(p in ("..", ".", "") for p in parts):
        return None
    path = root.joinpath(*parts)
    try:
        info = path.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    try:
        path.resolve(strict=True).relative_to(root.resolve(strict=True))
    except (OSError, ValueError):
        return None
    return path


# ---------------------------------------------------------------------------------------------
# Uploads: safe zip extraction and light validation of a views dataset


def extract_zip_safely(zip_path: Path, dest: Path, max_total_bytes: int, max_members: int = ZIP_MAX_MEMBERS) -> None:
    """Unpack `zip_path` into the empty folder `dest`, refusing anything that could escape it.

    Refused: absolute paths, drive letters, backslashes, `..`, symlinks, encrypted members, more than
    `max_members` members, more than `max_total_bytes` unpacked (counted on the bytes actually
    decompressed, not the sizes the zip claims). `__MACOSX/` resource forks are skipped.
    """

    def refuse(message: str) -> Im3dError:
        return Im3dError("invalid_upload", f"the views zip {message}; zip the dataset folder again with plain relative paths")

    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise Im3dError("invalid_upload", f"the upload is not a readable zip file ({error}); upload a .zip of the views folder") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > max_members:
            raise refuse(f"has {len(infos)} members, more than the {max_members} allowed")
        for info in infos:
            name = info.filename
            if "\\" in name or "\0" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
                raise refuse(f"member {name!r} has an absolute or non-portable path")
            if any(part == ".." for part in name.split("/")):
                raise refuse(f"member {name!r} points outside the archive ('..')")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise refuse(f"member {name!r} is a symlink, which is not allowed")
            if info.flag_bits & 0x1:
                raise refuse(f"member {name!r} is encrypted")
            # Before a byte is written: what the zip declares must fit, and no member may expand
            # more than real image data can (PNG/JPEG hardly compress; a bomb expands 1000x).
            if info.file_size > MAX_RATIO * max(info.compress_size, 1) and info.file_size > RATIO_FREE_BYTES:
                raise refuse(f"member {name!r} would expand {info.file_size // max(info.compress_size, 1)}x, which is a zip bomb, not images")
        declared = sum(info.file_size for info in infos)
        if declared > max_total_bytes:
            raise refuse(f"declares {declared // (1 << 20)} MiB unpacked, more than the {max_total_bytes // (1 << 20)} MiB allowed")
        dest.mkdir(parents=True, exist_ok=False)
        root = dest.resolve()
        total = 0
        for info in infos:
            parts = [p for p in info.filename.split("/") if p not in ("", ".")]
            if not parts or parts[0] == "__MACOSX":
                continue
            target = root.joinpath(*parts)
            if root not in target.parents:
                raise refuse(f"member {info.filename!r} points outside the archive")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as source, open(target, "xb") as out:
                    member_total = 0
                    while chunk := source.read(HASH_CHUNK):
                        total += len(chunk)
                        member_total += len(chunk)
                        if member_total > info.file_size:  # more than it declared: a lying header
                            raise refuse(f"member {info.filename!r} holds more bytes than its header declares")
                        if total > max_total_bytes:
                            raise refuse(f"unpacks to more than {max_total_bytes // (1 << 20)} MiB")
                        out.write(chunk)
            except FileExistsError:
                raise refuse(f"holds {info.filename!r} twice") from None
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as error:
                raise refuse(f"member {info.filename!r} cannot be decompressed ({error})") from None


VIEWS_JSON_NAMES = ("transforms.json", "transforms_train.json")  # Instant-NGP / NeRF-synthetic


def views_json(root: Path) -> Path | None:
    """The dataset JSON of a views folder, as `im3d.cameras.find_transforms` picks it."""
    for name in VIEWS_JSON_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def find_views_root(folder: Path) -> Path:
    """The folder holding `transforms.json` (or `transforms_train.json`): `folder` or its single sub-folder."""
    if views_json(folder) is not None:
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and p.name != "__MACOSX"]
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(subdirs) == 1 and not files and views_json(subdirs[0]) is not None:
        return subdirs[0]
    raise Im3dError("invalid_upload", "the views zip has no transforms.json at its root (or inside one top-level folder); zip the dataset folder that holds transforms.json"
    )


def image_size_from_header(path: Path, where: str, limits) -> tuple[int, int]:
    """(width, height) read from the file's header, without decoding a pixel; refuses an image past
    `limits.max_image_pixels` (server.max_image_pixels) before anything allocates for it."""
    from PIL import Image, UnidentifiedImageError

    size_text = ""
    try:
        with Image.open(path) as image:  # lazy: reads the header only
            width, height = image.size
            size_text = f"{width}x{height} pixels"
    except Image.DecompressionBombError:  # past Pillow's own limit: refused below, size unknown
        width = height = limits.max_image_pixels + 1
        size_text = f"over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise Im3dError("invalid_upload", f"{where} is not a readable PNG or JPEG image ({error}); export it again") from None
    if width * height > limits.max_image_pixels:
        raise Im3dError(
            "image_too_large",
            f"{where} is {size_text}, more than server.max_image_pixels ({limits.max_image_pixels}); "
            "downscale the images (the fit uses recon.image_size pixels anyway)",
        )
    return width, height


def check_image_upload(path: Path, limits) -> tuple[int, int]:
    return image_size_from_header(path, "the image", limits)


def split_files(root: Path) -> list[Path]:
    """Every dataset JSON of a views folder: transforms.json and each transforms_<split>.json."""
    return sorted(p for p in root.glob("transforms*.json") if p.is_file())


def check_views_dataset(root: Path, limits=None) -> int:
    """Check every split of a views folder before any job reads it; returns the train frame count.

    Each frame of each split must name a regular file inside `root` (`path_outside_upload`
    otherwise); images are measured from their headers against `limits` (server.max_image_pixels,
    max_frames, max_upload_pixels) so that no upload can ask the worker to decode more than that.
    """
    from im3d.config import ServerConfig

    limits = limits or ServerConfig()
    main = views_json(root)
    frames_seen, pixels, train_frames = 0, 0, 0
    for json_path in split_files(root):
        name = json_path.name

        def refuse(message: str, code: str = "invalid_upload") -> Im3dError:
            return Im3dError(code, f"{name} {message}")

        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise refuse(f"is not valid JSON ({error}); export the views again") from None
        frames = data.get("frames") if isinstance(data, dict) else None
        if not isinstance(frames, list) or (json_path == main and not frames):
            raise refuse("has no 'frames' list; it needs one entry per image with file_path and transform_matrix")
        frames_seen += len(frames)
        if frames_seen > limits.max_frames:
            raise refuse(f"brings the upload to {frames_seen} frames, more than server.max_frames ({limits.max_frames}); send fewer views", "image_too_large")
        for index, frame in enumerate(frames):
            file_path = frame.get("file_path") if isinstance(frame, dict) else None
            if not isinstance(file_path, str) or not file_path:
                raise refuse(f"frame {index} has no 'file_path' string")
            relative = file_path[2:] if file_path.startswith("./") else file_path
            candidates = [relative] if PurePosixPath(relative).suffix else [relative, relative + ".png"]
            found = next((p for p in (regular_file_inside(root, c) for c in candidates) if p is not None), None)
            if found is None:
                escapes = relative.startswith("/") or ".." in PurePosixPath(relative).parts or "\\" in relative
                if escapes:
                    raise refuse(f"frame {index} names {file_path!r}, a path outside the upload; use paths relative to the dataset folder", "path_outside_upload")
                raise refuse(f"frame {index} names {file_path!r}, which is not a file inside the zip; include every image it lists")
            width, height = image_size_from_header(found, f"{name} frame {index} ({file_path})", limits)
            pixels += width * height
            if pixels > limits.max_upload_pixels:
                raise refuse(
                    f"lists more than server.max_upload_pixels ({limits.max_upload_pixels}) pixels in all; send fewer or smaller images",
                    "image_too_large",
                )
        if json_path == main:
            train_frames = len(frames)
    return train_frames


def detect_upload_kind(content_type: str, head: bytes) -> str:
    """'image' or 'views' from the declared type, checked against the file's signature."""
    if content_type == "image/png":
        ok, kind = head.startswith(b"\x89PNG\r\n\x1a\n"), "image"
    elif content_type == "image/jpeg":
        ok, kind = head.startswith(b"\xff\xd8\xff"), "image"
    elif content_type == "application/zip":
        ok, kind = head.startswith(b"PK\x03\x04"), "views"
    else:
        raise Im3dError("unsupported_media_type", f"uploads must be image/png, image/jpeg or application/zip, not {content_type or 'missing'}")
    if not ok:
        raise Im3dError("invalid_upload", f"the uploaded bytes are not a {content_type} file (wrong signature); check the file and its Content-Type")
    return kind

