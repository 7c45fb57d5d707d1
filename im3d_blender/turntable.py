"""Turntable renders of Blender objects as a `transforms.json` multi-view dataset.

Importable by the add-on and by plain `bpy` scripts (bench/render_datasets.py). Objects are rendered
where they are: the cameras' world frame is Blender's world, cameras orbit the objects' bounding-box
centre at a distance that fits their bounding sphere in the field of view. Rendering happens in a
temporary scene that links the objects, so the artist's scene, its render settings and its other
objects are never touched.

Orbit convention (the backend's `im3d.cameras.orbit_position`): azimuth 0 looks from -Y (Blender's
front view), azimuth grows counter-clockwise seen from +Z;
position = centre + r * (cos el * sin az, -cos el * cos az, sin el).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import bpy
from mathutils import Matrix, Vector

View = tuple[float, float]  # (azimuth_deg, elevation_deg)
ProgressFn = Callable[[int, int], None]  # (views done, views in all)


class TurntableError(RuntimeError):
    """The turntable cannot be rendered; the message says what to change."""


class TurntableCancelled(TurntableError):
    pass


def orbit_views(num_views: int, elevation_deg: float, azimuth_start_deg: float = 0.0) -> list[View]:
    """`num_views` evenly spaced azimuths at one elevation."""
    if num_views < 1:
        raise TurntableError(f"the number of views must be at least 1, got {num_views}")
    return [(azimuth_start_deg + 360.0 * i / num_views, elevation_deg) for i in range(num_views)]


def orbit_position(azimuth_deg: float, elevation_deg: float, radius: float) -> Vector:
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return radius * Vector((math.cos(el) * math.sin(az), -math.cos(el) * math.cos(az), math.sin(el)))


def blender_intrinsics(
    lens_mm: float,
    sensor_width_mm: float,
    sensor_height_mm: float,
    sensor_fit: str,
    width: int,
    height: int,
    shift_x: float = 0.0,
    shift_y: float = 0.0,
    pixel_aspect: float = 1.0,
) -> tuple[float, float, float, float]:
    """Pixel intrinsics (fx, fy, cx, cy) of a Blender perspective camera, pixel centres at +0.5.

    A copy of the backend's `im3d.cameras.blender_intrinsics` (the add-on cannot import the
    backend); tests/test_blender_turntable.py checks that both agree.
    """
    if lens_mm <= 0:
        raise TurntableError(f"lens must be positive, got {lens_mm} mm")
    if sensor_fit == "AUTO":
        fit = "HORIZONTAL" if width >= height * pixel_aspect else "VERTICAL"
        sensor = sensor_width_mm
    elif sensor_fit == "HORIZONTAL":
        fit, sensor = "HORIZONTAL", sensor_width_mm
    elif sensor_fit == "VERTICAL":
        fit, sensor = "VERTICAL", sensor_height_mm
    else:
        raise TurntableError(f"unknown sensor fit {sensor_fit!r}")
    view_size = float(width) if fit == "HORIZONTAL" else float(height) * pixel_aspect
    focal = lens_mm / sensor * view_size
    cx = 0.5 * width - shift_x * view_size
    cy = 0.5 * height + shift_y * view_size / pixel_aspect
    return focal, focal / pixel_aspect, cx, cy


def camera_intrinsics(camera: bpy.types.Camera, render: bpy.types.RenderSettings) -> dict[str, float]:
    """`fl_x, fl_y, cx, cy, w, h, camera_angle_x, camera_angle_y` of a camera rendered with `render`."""
    if camera.type != "PERSP":
        raise TurntableError(f"camera {camera.name!r} is {camera.type}; only perspective cameras are supported")
    scale = render.resolution_percentage / 100.0
    width, height = round(render.resolution_x * scale), round(render.resolution_y * scale)
    fx, fy, cx, cy = blender_intrinsics(
        camera.lens,
        camera.sensor_width,
        camera.sensor_height,
        camera.sensor_fit,
        width,
        height,
        camera.shift_x,
        camera.shift_y,
        render.pixel_aspect_y / render.pixel_aspect_x,
    )
    return {
        "camera_angle_x": 2.0 * math.atan(0.5 * width / fx),
        "camera_angle_y": 2.0 * math.atan(0.5 * height / fy),
        "fl_x": fx,
        "fl_y": fy,
        "cx": cx,
        "cy": cy,
        "w": width,
        "h": height,
    }


def world_bounds(objects: Iterable[bpy.types.Object], depsgraph=None) -> tuple[Vector, float]:
    """Centre of the objects' world-space bounding box and the radius of the sphere around it holding them.

    Uses the evaluated objects (modifiers applied) when a depsgraph is given.
    """
    corners: list[Vector] = []
    for obj in objects:
        evaluated = obj.evaluated_get(depsgraph) if depsgraph is not None else obj
        matrix = evaluated.matrix_world
        corners.extend(matrix @ Vector(corner) for corner in evaluated.bound_box)
    if not corners:
        raise TurntableError("nothing to render: select at least one object with geometry")
    low = Vector(tuple(min(c[i] for c in corners) for i in range(3)))
    high = Vector(tuple(max(c[i] for c in corners) for i in range(3)))
    center = (low + high) / 2.0
    radius = max((c - center).length for c in corners)
    if radius <= 1e-9:
        raise TurntableError("the selected objects have no extent (an empty or a single point); nothing to render")
    return center, radius


def fit_distance(bounding_radius: float, fov_deg: float, margin: float = 1.05) -> float:
    """Camera distance at which a sphere of `bounding_radius` fits a (square) field of view."""
    if not 0.0 < fov_deg < 180.0:
        raise TurntableError(f"field of view must be within (0, 180) degrees, got {fov_deg}")
    return margin * bounding_radius / math.sin(math.radians(fov_deg) / 2.0)


def look_at(eye: Vector, target: Vector) -> Matrix:
    """Camera-to-world [4x4] of a Blender camera at `eye` looking at `target`, world +Z up."""
    direction = target - eye
    rotation = direction.to_track_quat("-Z", "Y").to_matrix().to_4x4()
    return Matrix.Translation(eye) @ rotation


class TurntableRender:
    """Renders objects from a list of views into `out_dir`; use as a context manager.

    Step-wise (`render_view(i)`) so a modal operator can spread the renders over timer ticks and
    keep Blender responsive; `render_all` does everything at once for scripts.
    """

    def __init__(
        self,
        objects: Sequence[bpy.types.Object],
        out_dir: str | os.PathLike,
        views: Sequence[View],
        *,
        size: int = 256,
        fov_deg: float = 40.0,
        margin: float = 1.05,
        engine: str = "CYCLES",
        samples: int = 16,
        lighting: str = "UNIFORM",
        source_scene: bpy.types.Scene | None = None,
        image_dir: str = "images",
        json_name: str = "transforms.json",
        image_prefix: str = "view_",
        distance: float | None = None,
    ):
        if not objects:
            raise TurntableError("nothing to render: select at least one object")
        if not views:
            raise TurntableError("no views to render")
        if size < 8:
            raise TurntableError(f"image size must be at least 8 pixels, got {size}")
        if lighting not in ("UNIFORM", "SCENE", "NONE"):
            raise TurntableError(f"lighting must be UNIFORM, SCENE or NONE, got {lighting!r}")
        self.objects = list(objects)
        self.out_dir = Path(out_dir)
        self.views = list(views)
        self.size, self.fov_deg, self.margin = int(size), float(fov_deg), float(margin)
        self.engine, self.samples, self.lighting = engine, int(samples), lighting
        self.source_scene = source_scene or bpy.context.scene
        self.image_dir, self.json_name, self.image_prefix = image_dir, json_name, image_prefix
        self.distance = distance
        self.scene: bpy.types.Scene | None = None
        self.camera: bpy.types.Object | None = None
        self.world: bpy.types.World | None = None
        self.center = Vector()
        self.bounding_radius = 0.0
        self.frames: list[dict] = []

    def __len__(self) -> int:
        return len(self.views)

    def __enter__(self) -> "TurntableRender":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # 1. temporary scene, camera, render settings
    def setup(self) -> None:
        depsgraph = bpy.context.evaluated_depsgraph_get()
        self.center, self.bounding_radius = world_bounds(self.objects, depsgraph)
        if self.distance is None:
            self.distance = fit_distance(self.bounding_radius, self.fov_deg, self.margin)
        (self.out_dir / self.image_dir).mkdir(parents=True, exist_ok=True)

        scene = bpy.data.scenes.new("IM3D Turntable")
        self.scene = scene
        for obj in self.objects:
            scene.collection.objects.link(obj)
        camera_data = bpy.data.cameras.new("IM3D Turntable Camera")
        camera_data.lens_unit = "FOV"
        camera_data.sensor_fit = "AUTO"
        camera_data.angle = math.radians(self.fov_deg)
        camera_data.clip_start = max(1e-3, 0.01 * (self.distance - self.bounding_radius))
        camera_data.clip_end = 10.0 * (self.distance + self.bounding_radius)
        self.camera = bpy.data.objects.new("IM3D Turntable Camera", camera_data)
        scene.collection.objects.link(self.camera)
        scene.camera = self.camera

        if self.lighting == "UNIFORM":
            # Even white light from every direction: shading without the scene's light rig, which
            # reconstructs into a texture close to the object's albedo.
            self.world = bpy.data.worlds.new("IM3D Turntable World")
            background = self.world.node_tree.nodes.get("Background")
            background.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
            background.inputs["Strength"].default_value = 1.0
            scene.world = self.world
        elif self.lighting == "SCENE":
            scene.world = self.source_scene.world
            for obj in self.source_scene.objects:  # the artist's lights shade the object as in their scene
                if obj.type == "LIGHT" and obj not in self.objects and not obj.hide_render:
                    scene.collection.objects.link(obj)

        render = scene.render
        try:
            render.engine = self.engine
        except TypeError:
            self.cleanup()
            raise TurntableError(f"render engine {self.engine!r} is not available in this Blender; enable it or choose CYCLES") from None
        render.resolution_x = render.resolution_y = self.size
        render.resolution_percentage = 100
        render.pixel_aspect_x = render.pixel_aspect_y = 1.0
        render.film_transparent = True
        render.use_file_extension = True
        settings = render.image_settings
        settings.file_format = "PNG"
        settings.color_mode = "RGBA"
        settings.color_depth = "8"
        settings.compression = 90
        scene.view_settings.view_transform = "Standard"
        scene.view_settings.look = "None"
        scene.view_settings.exposure = 0.0
        scene.view_settings.gamma = 1.0
        scene.display_settings.display_device = "sRGB"
        if self.engine == "CYCLES":
            scene.cycles.device = "CPU"
            scene.cycles.samples = max(1, self.samples)
            scene.cycles.use_denoising = False
            scene.cycles.use_adaptive_sampling = False
            scene.cycles.max_bounces = 4
        self.intrinsics = camera_intrinsics(camera_data, render)
        self.frames = []

    # 2. one view
    def render_view(self, index: int) -> Path:
        if self.scene is None or self.camera is None:
            raise TurntableError("TurntableRender.setup() must run before render_view()")
        azimuth, elevation = self.views[index]
        eye = self.center + orbit_position(azimuth, elevation, self.distance)
        self.camera.matrix_world = look_at(eye, self.center)
        self.scene.view_layers[0].update()  # the render must see the moved camera
        relative = f"{self.image_dir}/{self.image_prefix}{index:03d}.png"
        path = self.out_dir / relative
        self.scene.render.filepath = str(path)
        result = bpy.ops.render.render(write_still=True, scene=self.scene.name)
        if "FINISHED" not in result or not path.is_file():
            raise TurntableError(f"rendering view {index} failed ({result}); see Blender's console for the reason")
        c2w = self.camera.matrix_world.normalized()
        self.frames.append(
            {
                "file_path": relative,
                "transform_matrix": [list(row) for row in c2w],
                "azimuth_deg": azimuth,
                "elevation_deg": elevation,
            }
        )
        return path

    # 3. the dataset file
    def write_transforms(self, extra: dict | None = None) -> Path:
        meta = dict(self.intrinsics)
        meta["im3d"] = {
            "source": "blender-turntable",
            "center": list(self.center),
            "bounding_radius": self.bounding_radius,
            "distance": self.distance,
            "objects": [obj.name for obj in self.objects],
            **(extra or {}),
        }
        meta["frames"] = sorted(self.frames, key=lambda f: f["file_path"])
        path = self.out_dir / self.json_name
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        os.replace(temporary, path)
        return path

    def render_all(self, progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None) -> Path:
        for index in range(len(self.views)):
            if cancel is not None and cancel():
                raise TurntableCancelled("turntable rendering was cancelled")
            self.render_view(index)
            if progress is not None:
                progress(index + 1, len(self.views))
        return self.write_transforms()

    # 4. leave no trace in the .blend
    def cleanup(self) -> None:
        if self.scene is not None:
            bpy.data.scenes.remove(self.scene)
            self.scene = None
        if self.camera is not None:
            camera_data = self.camera.data
            bpy.data.objects.remove(self.camera)
            bpy.data.cameras.remove(camera_data)
            self.camera = None
        if self.world is not None:
            bpy.data.worlds.remove(self.world)
            self.world = None


def render_turntable(
    objects: Sequence[bpy.types.Object],
    out_dir: str | os.PathLike,
    views: Sequence[View] | None = None,
    *,
    num_views: int = 16,
    elevation_deg: float = 15.0,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    **settings,
) -> Path:
    """Render `objects` from `views` (default: `num_views` on an orbit) and return the transforms.json path."""
    views = list(views) if views is not None else orbit_views(num_views, elevation_deg)
    with TurntableRender(objects, out_dir, views, **settings) as turntable:
        return turntable.render_all(progress, cancel)
