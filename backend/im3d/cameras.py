"""Cameras: orbits, Blender/OpenGL <-> OpenCV conversions, and `transforms.json` datasets.

Conventions (DESIGN §4):
- world frame: Blender's, Z up, metres;
- on disk: `transforms.json` with camera-to-world matrices in OpenGL/Blender camera axes
  (x right, y up, looking down -z);
- in tensors: world-to-camera `viewmats [C,4,4]` in OpenCV axes (x right, y down, looking
  down +z) and pixel intrinsics `Ks [C,3,3]` whose pixel centres sit at +0.5, the convention of
  `gsplat.rasterization`.

Azimuth 0 of an orbit looks at the object from -Y (Blender's front view, where a reference
image is taken from); azimuth grows counter-clockwise seen from above (+Z).

`im3d_blender/turntable.py` keeps deliberate copies of `orbit_position` and `blender_intrinsics`:
the add-on runs inside Blender's Python and cannot import this backend. A change here must be
made there too; tests/test_blender_turntable.py checks that the two agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from im3d.errors import Im3dError
from im3d.io_utils import atomic_write_json

# OpenGL camera axes -> OpenCV camera axes (flip y and z), applied on the right of camera-to-world.
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


class DatasetError(Im3dError, ValueError):
    """A multi-view dataset cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str, code: str = "invalid_views"):
        self.path = str(path)
        self.problem = problem
        super().__init__(code, f"{path}: {problem}")


@dataclass
class Cameras:
    viewmats: Tensor  # [C, 4, 4] world-to-camera, OpenCV axes
    Ks: Tensor  # [C, 3, 3] pixel intrinsics, pixel centres at +0.5
    width: int
    height: int

    def __post_init__(self) -> None:
        C = self.viewmats.shape[0]
        assert self.viewmats.shape == (C, 4, 4), self.viewmats.shape
        assert self.Ks.shape == (C, 3, 3), self.Ks.shape

    def __len__(self) -> int:
        return int(self.viewmats.shape[0])

    def __getitem__(self, index: Any) -> "Cameras":
        if isinstance(index, int):
            index = [index]
        return Cameras(self.viewmats[index], self.Ks[index], self.width, self.height)

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(self.viewmats.to(device), self.Ks.to(device), self.width, self.height)

    def camtoworlds_gl(self) -> Tensor:
        """[C, 4, 4] camera-to-world in OpenGL/Blender axes (what transforms.json stores)."""
        return viewmats_to_c2w_gl(self.viewmats)

    def centers(self) -> Tensor:
        """[C, 3] camera positions in the world."""
        return torch.linalg.inv(self.viewmats.double())[:, :3, 3].to(self.viewmats.dtype)

    def resized(self, width: int, height: int) -> "Cameras":
        """The same cameras seen at another image size (intrinsics scaled)."""
        sx, sy = width / self.width, height / self.height
        Ks = self.Ks.clone()
        Ks[:, 0, :] *= sx
        Ks[:, 1, :] *= sy
        return Cameras(self.viewmats.clone(), Ks, width, height)


# ----------------------------------------------------------------------------------------------
# Conversions


def c2w_gl_to_viewmats(c2w_gl: Tensor) -> Tensor:
    """Camera-to-world in OpenGL/Blender axes [C,4,4] -> world-to-camera in OpenCV axes [C,4,4]."""
    assert c2w_gl.shape[-2:] == (4, 4), c2w_gl.shape
    flip = torch.as_tensor(GL_TO_CV, dtype=c2w_gl.dtype, device=c2w_gl.device)
    return torch.linalg.inv(c2w_gl @ flip)


def viewmats_to_c2w_gl(viewmats: Tensor) -> Tensor:
    """World-to-camera in OpenCV axes [C,4,4] -> camera-to-world in OpenGL/Blender axes [C,4,4]."""
    assert viewmats.shape[-2:] == (4, 4), viewmats.shape
    flip = torch.as_tensor(GL_TO_CV, dtype=viewmats.dtype, device=viewmats.device)
    return torch.linalg.inv(viewmats) @ flip


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def fov_to_focal(fov_rad: float, size_px: float) -> float:
    return 0.5 * size_px / math.tan(0.5 * fov_rad)


def focal_to_fov(focal_px: float, size_px: float) -> float:
    return 2.0 * math.atan(0.5 * size_px / focal_px)


SensorFit = Literal["AUTO", "HORIZONTAL", "VERTICAL"]


def blender_intrinsics(
    lens_mm: float,
    sensor_width_mm: float,
    sensor_height_mm: float,
    sensor_fit: SensorFit,
    width: int,
    height: int,
    shift_x: float = 0.0,
    shift_y: float = 0.0,
    pixel_aspect: float = 1.0,
) -> np.ndarray:
    """Pixel intrinsics [3,3] of a Blender perspective camera (as Blender's own view plane).

    Follows `BKE_camera_params_compute_viewplane`: the sensor size maps to the image width
    (horizontal fit) or height (vertical fit); AUTO fits the larger side with the sensor width;
    lens shift is a fraction of that same side. `pixel_aspect` is resolution Y aspect / X aspect.
    """
    if lens_mm <= 0:
        raise ValueError(f"lens must be positive, got {lens_mm} mm")
    if sensor_fit == "AUTO":
        fit = "HORIZONTAL" if width >= height * pixel_aspect else "VERTICAL"
        sensor = sensor_width_mm
    elif sensor_fit == "HORIZONTAL":
        fit, sensor = "HORIZONTAL", sensor_width_mm
    elif sensor_fit == "VERTICAL":
        fit, sensor = "VERTICAL", sensor_height_mm
    else:
        raise ValueError(f"unknown sensor fit {sensor_fit!r}")
    view_size = float(width) if fit == "HORIZONTAL" else float(height) * pixel_aspect
    focal = lens_mm / sensor * view_size
    cx = 0.5 * width - shift_x * view_size
    cy = 0.5 * height + shift_y * view_size / pixel_aspect
    return intrinsics_matrix(focal, focal / pixel_aspect, cx, cy)


def look_at_c2w_gl(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """Camera-to-world [4,4] in OpenGL axes for a camera at `eye` looking at `target`."""
    forward = np.asarray(target, float) - np.asarray(eye, float)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-8:  # looking straight up or down: any right vector will do
        right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right /= np.linalg.norm(right)
    true_up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, true_up, -forward, eye
    return c2w


def orbit_position(azimuth_deg: float, elevation_deg: float, radius: float) -> np.ndarray:
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return radius * np.array([math.cos(el) * math.sin(az), -math.cos(el) * math.cos(az), math.sin(el)])


def orbit_cameras(
    num_views: int,
    elevation_deg: float = 10.0,
    radius: float = 2.5,
    fov_deg: float = 33.8,
    width: int = 256,
    height: int | None = None,
    azimuth_start_deg: float = 0.0,
    target: tuple[float, float, float] = (0.0, 0.0, 0.0),
    azimuths_deg: list[float] | None = None,
) -> Cameras:
    """Cameras on a circle around `target`, evenly spaced in azimuth unless `azimuths_deg` is given.

    `fov_deg` is the horizontal field of view. Returns float32 tensors on the CPU.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be at least 1, got {num_views}")
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    if not 0 < fov_deg < 180:
        raise ValueError(f"fov_deg must be within (0, 180), got {fov_deg}")
    height = width if height is None else height
    if azimuths_deg is None:
        azimuths_deg = [azimuth_start_deg + 360.0 * i / num_views for i in range(num_views)]
    focal = fov_to_focal(math.radians(fov_deg), width)
    K = intrinsics_matrix(focal, focal, 0.5 * width, 0.5 * height)
    target_np = np.asarray(target, float)
    c2ws = [look_at_c2w_gl(target_np + orbit_position(a, elevation_deg, radius), target_np) for a in azimuths_deg]
    c2w = torch.as_tensor(np.stack(c2ws), dtype=torch.float64)
    viewmats = c2w_gl_to_viewmats(c2w).float()
    Ks = torch.as_tensor(np.stack([K] * len(c2ws)), dtype=torch.float32)
    return Cameras(viewmats, Ks, width, height)


def project_points(points: Tensor, viewmats: Tensor, Ks: Tensor) -> tuple[Tensor, Tensor]:
    """World points [N,3] -> pixel coordinates [C,N,2] (continuous, pixel centres at +0.5), depths [C,N]."""
    assert points.shape[-1] == 3, points.shape
    homogeneous = torch.cat([points, torch.ones_like(points[:, :1])], dim=-1)  # [N, 4]
    cam = torch.einsum("cij,nj->cni", viewmats, homogeneous)[..., :3]  # [C, N, 3]
    depth = cam[..., 2]
    pix = torch.einsum("cij,cnj->cni", Ks, cam)
    return pix[..., :2] / pix[..., 2:3], depth


# ----------------------------------------------------------------------------------------------
# transforms.json datasets


@dataclass
class MultiViewDataset:
    cameras: Cameras
    images: Tensor  # [C, H, W, 3] float32 in [0, 1], straight (not premultiplied) colour
    masks: Tensor  # [C, H, W, 1] float32 in [0, 1]; alpha, or ones when the images have none
    file_paths: list[str]  # as written in the JSON
    source: Path | None = None  # the JSON file it was read from
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys, kept for round trips

    def composited(self, background: Tensor | list[float]) -> Tensor:
        """[C, H, W, 3] images over a background colour."""
        bg = torch.as_tensor(background, dtype=self.images.dtype).view(1, 1, 1, 3)
        return self.images * self.masks + bg * (1.0 - self.masks)


TRANSFORMS_NAMES = ("transforms.json", "transforms_train.json")


def find_transforms(path: str | Path, split: str = "train") -> Path:
    """The JSON of a dataset folder (or the file itself): transforms.json, else transforms_{split}.json."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DatasetError(path, "no such dataset folder or file")
    candidates = ["transforms.json", f"transforms_{split}.json"] if split == "train" else [f"transforms_{split}.json"]
    for name in candidates:
        if (path / name).is_file():
            return path / name
    raise DatasetError(path, f"no {' or '.join(candidates)} in this folder")


def read_transforms(
    path: str | Path, split: str = "train", max_size: int | None = None, max_pixels: int | None = None, cancel=None
) -> MultiViewDataset:
    """Read a NeRF-synthetic / Instant-NGP / nerfstudio `transforms.json` and its images.

    Intrinsics come from `fl_x, fl_y, cx, cy, w, h` (top level or per frame) or from
    `camera_angle_x` (and optional `camera_angle_y`) with the image size. `max_size` downsizes
    each image as it is decoded, so memory follows `max_size`, not the files (intrinsics follow).
    `max_pixels` refuses an image whose header says it is larger, before decoding it. Every image
    must lie inside the dataset's folder. `cancel()` is checked between images.
    """
    from im3d.errors import check_cancel

    json_path = find_transforms(path, split)
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DatasetError(json_path, f"cannot be read: {error.strerror}") from None
    except ValueError as error:
        raise DatasetError(json_path, f"is not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise DatasetError(json_path, "must contain a JSON object")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise DatasetError(json_path, "has no 'frames' list (or it is empty)")

    images, masks, c2ws, Ks, file_paths = [], [], [], [], []
    size: tuple[int, int] | None = None
    size_source = ""
    for index, frame in enumerate(frames):
        where = f"frames[{index}]"
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise DatasetError(json_path, f"{where} needs 'file_path' and 'transform_matrix'")
        check_cancel(cancel)
        image_path = _resolve_image(json_path, str(frame["file_path"]), where)
        rgb, alpha, (w, h) = load_rgba(image_path, max_size, max_pixels)
        if size is None:
            size, size_source = (w, h), image_path.name
        elif (w, h) != size:
            raise DatasetError(
                image_path,
                f"is {w}x{h} but {size_source} is {size[0]}x{size[1]}: all images of a dataset must have one size",
            )
        c2w = _parse_matrix(json_path, frame["transform_matrix"], where)
        K = _parse_intrinsics(json_path, meta, frame, w, h, where)
        images.append(rgb)
        masks.append(alpha)
        c2ws.append(c2w)
        Ks.append(K)
        file_paths.append(str(frame["file_path"]))

    assert size is not None
    width, height = size
    c2w_t = torch.as_tensor(np.stack(c2ws), dtype=torch.float64)
    cameras = Cameras(
        c2w_gl_to_viewmats(c2w_t).float(), torch.as_tensor(np.stack(Ks), dtype=torch.float32), width, height
    )
    image_t = torch.as_tensor(np.stack(images))
    mask_t = torch.as_tensor(np.stack(masks))
    if image_t.shape[2] != width or image_t.shape[1] != height:  # decoded at a smaller size
        cameras = cameras.resized(int(image_t.shape[2]), int(image_t.shape[1]))
    extra = {k: v for k, v in meta.items() if k not in _INTRINSIC_KEYS and k != "frames"}
    return MultiViewDataset(cameras, image_t, mask_t, file_paths, json_path, extra)


def write_transforms(
    path: str | Path,
    cameras: Cameras,
    file_paths: list[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write `transforms.json` (both `camera_angle_x` and `fl_x/fl_y/cx/cy/w/h` forms), atomically.

    Intrinsics are written per frame when the cameras differ, else once at the top level.
    """
    if len(file_paths) != len(cameras):
        raise ValueError(f"{len(file_paths)} file paths for {len(cameras)} cameras")
    c2ws = viewmats_to_c2w_gl(cameras.viewmats.double()).tolist()
    Ks = cameras.Ks.double()
    shared = bool(torch.allclose(Ks, Ks[:1].expand_as(Ks)))
    meta: dict[str, Any] = dict(extra or {})

    def intrinsics(K: Tensor) -> dict[str, float]:
        fx, fy, cx, cy = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))
        return {"fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": cameras.width, "h": cameras.height}

    if shared:
        meta.update(intrinsics(Ks[0]))
        meta["camera_angle_x"] = focal_to_fov(float(Ks[0, 0, 0]), cameras.width)
        meta["camera_angle_y"] = focal_to_fov(float(Ks[0, 1, 1]), cameras.height)
    frames = []
    for i, (file_path, c2w) in enumerate(zip(file_paths, c2ws)):
        frame: dict[str, Any] = {"file_path": file_path, "transform_matrix": c2w}
        if not shared:
            frame.update(intrinsics(Ks[i]))
        frames.append(frame)
    meta["frames"] = frames
    atomic_write_json(Path(path), meta)


def fit_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """The size an image of `width` x `height` is decoded to when its larger side may be `max_size`."""
    if max_size is None or max(width, height) <= max_size:
        return width, height
    scale = max_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def load_rgba(path: Path, max_size: int | None = None, max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """An image file -> (RGB [h,w,3], alpha [h,w,1]) float32 in [0, 1], and its size on disk (w, h).

    Alpha is 1 without a channel. With `max_size`, the image is downscaled (premultiplied, so no
    colour bleeds from transparent pixels) while still 8-bit, before the float copy is made.
    `max_pixels` is checked on the header, before decoding (`image_too_large`).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            size = image.size
            if max_pixels is not None and size[0] * size[1] > max_pixels:
                raise DatasetError(path, f"is {size[0]}x{size[1]} pixels, more than the {max_pixels} allowed; downscale the images", "image_too_large")
            target = fit_size(*size, max_size)
            if image.format == "JPEG" and target != size:
                image.draft("RGB", target)  # JPEG decodes at 1/2, 1/4, 1/8 scale directly
            image.load()
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            if image.mode in ("I;16", "I;16B", "I", "F"):
                gray = image.convert("F")
                if gray.size != target:
                    gray = gray.resize(target, Image.BILINEAR, reducing_gap=None)
                array = np.asarray(gray, dtype=np.float32)
                array = array / (65535.0 if array.max() > 255 else 255.0)
                rgba = np.concatenate([np.repeat(array[..., None], 3, -1), np.ones_like(array[..., None])], -1)
            else:
                rgba_image = image.convert("RGBA")
                if rgba_image.size != target:
                    rgba_image = rgba_image.convert("RGBa").resize(target, Image.BILINEAR).convert("RGBA")
                rgba = np.asarray(rgba_image, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DatasetError(path, "image file is missing") from None
    except Image.DecompressionBombError as error:
        raise DatasetError(path, f"is too large to decode safely ({error}); downscale the images", "image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(path, f"is not a readable image: {error}") from None
    alpha = rgba[..., 3:4] if has_alpha else np.ones_like(rgba[..., 3:4])
    return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(alpha), size


_INTRINSIC_KEYS = {"camera_angle_x", "camera_angle_y", "fl_x", "fl_y", "cx", "cy", "w", "h"}


def _resolve_image(json_path: Path, file_path: str, where: str) -> Path:
    """The image a frame names; it must lie inside the dataset's folder (symlinks resolved), so a
    dataset can never make the backend read a file elsewhere, whatever the split."""
    root = json_path.parent.resolve()
    candidate = (root / file_path).resolve()
    if candidate != root and root not in candidate.parents:
        raise DatasetError(
            json_path, f"{where}.file_path {file_path!r} points outside the dataset folder; use paths relative to it", "path_outside_upload"
        )
    if candidate.is_file():
        return candidate
    if not candidate.suffix:  # NeRF-synthetic leaves the .png off
        for suffix in (".png", ".jpg", ".jpeg", ".exr"):
            if candidate.with_suffix(suffix).is_file():
                return candidate.with_suffix(suffix)
    raise DatasetError(candidate, f"image file is missing (listed as {where}.file_path in {json_path.name})")


def _parse_matrix(json_path: Path, value: Any, where: str) -> np.ndarray:
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(json_path, f"{where}.transform_matrix is not a matrix of numbers") from None
    if matrix.shape == (3, 4):
        matrix = np.vstack([matrix, [0.0, 0.0, 0.0, 1.0]])
    if matrix.shape != (4, 4):
        raise DatasetError(json_path, f"{where}.transform_matrix must be 4x4, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise DatasetError(json_path, f"{where}.transform_matrix contains NaN or infinity")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-9 or abs(np.linalg.det(matrix)) < 1e-9:
        raise DatasetError(json_path, f"{where}.transform_matrix is not invertible (its rotation part is singular)")
    return matrix


def _parse_intrinsics(json_path: Path, meta: dict, frame: dict, w: int, h: int, where: str) -> np.ndarray:
    def get(key: str) -> Any:
        return frame.get(key, meta.get(key))

    def number(key: str) -> float:
        value = get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DatasetError(json_path, f"'{key}' (for {where}) must be a finite number, got {value!r}")
        return float(value)

    for key in ("w", "h"):
        if get(key) is not None and int(number(key)) != (w if key == "w" else h):
            raise DatasetError(
                json_path, f"'{key}' is {get(key)} but the image of {where} is {w}x{h}"
            )
    if get("fl_x") is not None or get("fl_y") is not None:
        fx = number("fl_x") if get("fl_x") is not None else number("fl_y")
        fy = number("fl_y") if get("fl_y") is not None else fx
        cx = number("cx") if get("cx") is not None else 0.5 * w
        cy = number("cy") if get("cy") is not None else 0.5 * h
    elif get("camera_angle_x") is not None:
        angle_x = number("camera_angle_x")
        if not 0 < angle_x < math.pi:
            raise DatasetError(json_path, f"camera_angle_x must be within (0, pi) radians, got {angle_x}")
        fx = fov_to_focal(angle_x, w)
        fy = fov_to_focal(number("camera_angle_y"), h) if get("camera_angle_y") is not None else fx
        cx, cy = 0.5 * w, 0.5 * h
    else:
        raise DatasetError(json_path, f"no intrinsics for {where}: give camera_angle_x or fl_x/fl_y/cx/cy/w/h")
    if fx <= 0 or fy <= 0:
        raise DatasetError(json_path, f"focal length for {where} must be positive, got {fx}, {fy}")
    return intrinsics_matrix(fx, fy, cx, cy)


