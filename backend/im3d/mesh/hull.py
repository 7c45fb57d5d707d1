"""Surface from what the views and the splats' renders agree on: silhouettes, then depth carving.

    field, grid, used = carve_field(splats, gaussians, resolution, cameras, masks, depth_margin)  # inside > 0
    vertices_ijk, faces = mcubes.marching_cubes(field, 0.0)
    # then outlines.fit_outlines(vertices, faces, used.cameras, used.silhouettes): sub-pixel outlines

Measured on fitted splats (bench/bench_mesh_fidelity.py, docs/benchmarks.md), the silhouettes are
what a fit gets right (mask IoU 0.98-0.995 at held-out views) while its depth is not: at 128² and a
few hundred steps the rendered surface of a sphere sits 0.05-0.07 radii behind the true one, and
the splats' density surface follows that. So the views decide first and the splats second:

1. **Visual hull** from the fitted views' masks: a point is outside when any view sees it outside
   its mask and the splats are not near-opaque there (one bad mask cannot cut the object). The
   field is continuous (the soft mask, bilinearly sampled, minus one half, times the pixel's size
   at the point's depth), so marching cubes places the surface to a fraction of a pixel and thin
   parts seen in the views (4 cm legs) stay.
2. **Depth carving** where the splats' rendering shows space the hull cannot see (the inside of
   a bowl or a cup, a torus' hole, the hollow of a cow's belly): a point more than a margin in
   front of the splats' median depth, at a pixel the splats cover, is outside; the margin keeps
   the fit's depth error from eating convex surfaces. It is `depth_margin` where the surface
   faces the view and grows as 1/cos of its slant, up to three times that (70°): the fit's depth
   lies behind the true surface, the more so where the surface is slanted to the view (95th
   percentile of rendered minus true depth, facing -> 70° and more: cow 0.06 -> 0.11 r, bunny
   0.05 -> 0.10 r, a fitted sphere 0.10 -> 0.21 r), and a fixed margin either keeps 0.15 of the
   half-size of hull in every shallow hollow (a cow's belly, a bunny's flank) or eats slanted
   surfaces. Where the rendered surface lies more than twice the largest margin behind the
   hull's own front, it is a real concavity, not a recessed fit, and is carved all the way down
   to it (so a cup's floor is not raised by the margin). Where the rendering is faint, depth
   says nothing, and it never carves a part under three pixels wide in most views (a twig): the
   fit's depth there lags by more than the part is thick, or is the surface behind it where the
   part covers under half of a pixel, and the silhouettes from all round shape it anyway.

3. **The unseen underside.** A point inside every mask and behind every view's rendered surface
   is inside, so from a ring of views above an object the hull hangs a cone under it that no view
   can see or carve (a quarter of the radius deep from 15° up: the mug's and the wedge's worst
   error, F 0.86 / 0.71). When the views lie to one side (their mean direction from where they
   look is not ~0) and surround it (no gap over 120° around that direction), and the object stands on
   a base there (the views see walls facing them just above the lowest seen point, where a round
   underside's limb is seen grazing; or its sections narrow toward that point well below the
   slope at which the views would graze a limb there; or its section there is most of its
   width), everything beyond the lowest point any view *sees* - the splats' rendered surface,
   back-projected, its 99.9th percentile - is cut flat (F 0.97 / 0.94). Under a round object the
   lowest seen point lies well above its bottom (0.3 radii under a sphere seen from 20° up and 1.7
   away): there the section is eroded below it as the circle through it and a section a little
   higher says (a sphere, a lying capsule: exact), which closes it near its true bottom where the
   hull's cone hung 0.1-0.2 radii lower. The top is closed the same way where it stands above
   the cameras (a bottle from 10° up), and a ring through the object's middle (a turntable at
   elevation 0, SV3D_u's) sees neither its top nor its bottom: both ends of the ring's axis are
   closed so (bench at elevation 0: table F 0.751 -> 0.997, mug 0.810 -> 0.983, wedge 0.725 ->
   0.899). Views all round the object, or from one side only, leave the hull's closure.

4. **Hidden undersides of overhangs** (`overhangs.py`): no view sees under a table's top, so the
   hull hangs a tent there, from the top's near edges down along the rays that pass under them.
   Where the seen surface it meets is a side facing the views that ends level, the underside is
   closed at that height (table F 0.780 -> 0.998, chair 0.866 -> 0.990).

5. **Hidden hollows** (`hollows.py`): a bowl's inside below the rays that graze its rim is seen
   by no view and stays filled; it is opened under a hidden floor that lies in a pit, to a seen
   wall's thickness.

There are no inner walls. The carving depths are median-filtered (a lone deep pixel would dig a
pit that a lit render shows as a dark speck). Both fields are evaluated coarse-to-fine (every
other grid point, then the band where the sign changes, then exact values wherever marching cubes
reads them), five times fewer evaluations at 256³.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import scipy.ndimage
import torch

from im3d.cameras import Cameras
from im3d.errors import check_cancel
from im3d.mesh.density import DensityGrid, GaussianArrays, grid_bounds
from im3d.mesh.errors import MeshingError
from im3d.mesh.hollows import open_hidden_hollows
from im3d.mesh.overhangs import close_hidden_undersides
from im3d.mesh.voxels import across, camera_centres, dilate, project
from im3d.mesh.tsdf import COVERED_ALPHA, render_depths

# Grid points handled per projection batch: bounds the temporaries (~40 bytes each) on big grids.
POINTS_PER_BATCH = 1 << 21
# Field values are clamped to this many voxels either side of the surface: only the band near the
# surface matters to marching cubes, and a bounded field keeps min() over views well-behaved.
CLAMP_VOXELS = 3.0
# The splats' coverage stands in for a view's mask where alpha - this exceeds 1/2 (alpha > 0.95).
OPAQUE_SPLATS = 0.45
# Carving depths are the median over this many pixels square (see carve_field: 3 -> 5 measured
# F@0.02 median 0.944 -> 0.952, normal consistency 0.935 -> 0.942 on the nine bench objects).
MEDIAN_PIXELS = 5
# The carving margin is at most THIN_MARGIN of the silhouette's local half-width: the largest
# distance to its outline within THIN_REACH largest margins of the pixel, so only parts narrower
# than that (legs, arms, a chair's rails) are affected, not a body's rim where the fit's depth
# lies furthest behind (looked for within 1 largest margin, the bowl's F fell 0.800 -> 0.742;
# share 0.25: alligator -2.1 dB). Measured in docs/benchmarks.md ("Thin parts' margin").
THIN_MARGIN = 0.4
THIN_REACH = 3.0
# A part under three pixels wide in a view (outside a 3 x 3 opening of its silhouette, grown by a
# pixel) has its silhouette raised by THIN_LIFT there: a twig or a tail's tip covering under half of
# its pixels is outside the 1/2 edge, and the grid's samples a pixel apart miss or break it. Only
# for points that lie in such parts in at least THIN_VIEWS of the views: a twig is thin from
# everywhere, a sheet only edge-on (two views of sixteen), and raised there it thickened (woody
# -1.8 dB). The same points are not depth-carved (the cap's twigs: 33.9 -> 36.6 dB). Measured on 63
# objects (docs/benchmarks.md, "A fifth set, never tuned on, and thin branches": 0.25 / 0.5 before,
# 0.35 / 0.375 gained up to 0.5 dB on the cap, the chair's wires and the alligator's tail, lost
# nothing; a raise of 0.4 gained a little more but lifts whatever covers a tenth of a pixel, where
# a soft matte's halo lies).
THIN_LIFT = 0.35
THIN_VIEWS = 0.375
# Views are carved at no more than this many pixels across per grid sample across.
MAX_PIXELS_PER_VOXEL = 1.0
# The depth margin grows as 1/cos of the surface's slant to the view, up to this factor (70°).
# A cap of 2 and fixed margins (0.08, the old 0.15) were measured and not kept (docs/benchmarks.md).
SLANT_MARGIN_FACTOR = 3.0


def carve_field(
    splats: dict,
    gaussians: GaussianArrays,
    resolution: int,
    cameras: Cameras,  # the fitted views
    masks: torch.Tensor,  # [C, H, W, 1] their masks in [0, 1]
    depth_margin: float,  # share of the grid's half-size a point must lie in front of a rendered surface that faces the view to be carved
    flat_underside: bool = True,  # close what no view sees beyond the lowest seen point (flat or rounded), away from the cameras
    open_hollows: bool = True,  # open the hidden inside of a container (mesh/hollows.py)
    close_overhangs: bool = True,  # close the hidden underside of an overhang at its seen edge (mesh/overhangs.py)
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> tuple[np.ndarray, DensityGrid, "Silhouettes"]:
    """Inside-positive field (world units, clamped) on a grid around the splats, iso-level 0, and
    the silhouettes it was cut from (at the size it used), for `outlines.fit_outlines`.

    Only the fitted views carve: views from elsewhere (below an orbit, say) see splats nothing
    constrained and carved holes through measured objects (docs/benchmarks.md).
    """
    report = progress or (lambda f, m: None)
    if cameras is None or masks is None or len(cameras) == 0:
        raise MeshingError("no_views", "mesh.method 'hull' needs the fitted views and their masks")
    C, H, W, _ = masks.shape
    if len(cameras) != C:
        raise MeshingError("no_views", f"{len(cameras)} fitted cameras but {C} masks")
    # Pixels finer than a voxel add little to the grid (the soft mask is sampled bilinearly) and cost time (21 frames at 576²).
    scale = min(1.0, MAX_PIXELS_PER_VOXEL * resolution / max(H, W))
    if scale < 1.0:
        H, W = max(1, round(H * scale)), max(1, round(W * scale))
        masks = torch.nn.functional.interpolate(masks.float().permute(0, 3, 1, 2), size=(H, W), mode="area").permute(0, 2, 3, 1)
    cameras = cameras.resized(W, H) if (cameras.width, cameras.height) != (W, H) else cameras
    origin, voxel, shape = grid_bounds(gaussians, resolution)
    clamp = CLAMP_VOXELS * voxel

    report(0.0, f"rendering splat depth, {len(cameras)} views")
    rendered = render_depths(splats, cameras, cancel, lambda f, m: report(0.4 * f, m))
    depth = torch.from_numpy(rendered.depths).float()  # [V, H, W] camera z
    alpha = torch.from_numpy(rendered.alphas).float()
    mask = masks[..., 0].float().cpu()
    # Silhouettes, 1/2 at the edge: the view's mask, or where the splats are near-opaque (an
    # inconsistent mask - a generated frame's, say - never cuts away what the fit holds up in the
    # other views). Their edge counts at alpha 0.95, so the splats' soft fringe never grows the hull.
    silhouette = torch.maximum(mask, alpha - OPAQUE_SPLATS)
    # Depth speaks where the splats cover the pixel and the mask agrees.
    depth = torch.where((alpha >= COVERED_ALPHA) & (mask >= 0.5), depth, torch.full_like(depth, float("inf")))

    # float32 throughout: world coordinates of about 1 keep ~1e-7 relative precision, far below a voxel.
    viewmats = cameras.viewmats.float().cpu()
    Ks = cameras.Ks.float().cpu()
    axes = [torch.arange(n, dtype=torch.float32) * voxel + float(origin[a]) for a, n in enumerate(shape)]

    # 1. Visual hull of the masks.
    lifted, thin = _thin_parts(silhouette)
    silhouette_distance = lambda points: _silhouette_distance(points, viewmats, Ks, silhouette, lifted, thin, clamp)  # noqa: E731
    hull, hull_exact = _coarse_to_fine(silhouette_distance, axes, None, cancel, lambda f: report(0.4 + 0.3 * f, "visual hull of the views"))
    passes = [(hull, hull_exact, silhouette_distance)]

    # 2. Depth carving: space more than the margin in front of the splats' rendered surface (more
    #    where it is slanted to the view). Where that surface lies far behind the hull's own front
    #    (more than twice the largest margin: the inside of a cup, not a fit's recessed depth), it
    #    is a concavity and is carved all the way to it.
    margin = depth_margin * 0.5 * voxel * (max(shape) - 1)
    front = _front_depth(hull, origin, voxel, viewmats, Ks, W, H)  # [C, H, W]
    concave = torch.isfinite(depth) & (depth - front > 2 * SLANT_MARGIN_FACTOR * margin)
    # The slant is read off the median-filtered depth: raw, a Gaussian's bump tripled the margin
    # beside a facing one and left ripples (docs/benchmarks.md, "Fairing").
    slant = _slant_margin(_median_filter(depth, torch.isfinite(depth), MEDIAN_PIXELS), Ks, margin)
    # ... but never more than a share of a thin part's own half-width: a margin as wide as a leg
    # left its cross-section the hull's polygon (a pixel fat at views off the orbit).
    slant = torch.minimum(slant, THIN_MARGIN * _half_width(mask, depth, Ks, THIN_REACH * SLANT_MARGIN_FACTOR * margin))
    carve_to = torch.where(concave, depth - voxel, depth - slant)
    # Each pixel carves to the median of its 5x5 neighbourhood (neighbours without depth count as
    # the pixel itself): one pixel the splats leave deep (a gap between Gaussians) would dig a pit
    # a pixel wide (the pits and scratches of a lit render), while on a slanted surface the median
    # is the pixel's own depth, so carving keeps its place there.
    known = torch.isfinite(carve_to)
    carve_to = _median_filter(carve_to, known, MEDIAN_PIXELS)
    # No information: carve up to the camera plane, i.e. nothing. Finite everywhere, so the depth
    # maps can be sampled bilinearly (a smooth surface, not a staircase of pixels), and next to
    # such pixels the blend carves less, never more.
    carve_to = torch.where(known, carve_to, torch.zeros_like(carve_to))
    if bool((carve_to > 0).any()):
        depth_distance = lambda points: _depth_distance(points, viewmats, Ks, carve_to, thin, clamp)  # noqa: E731
        stage = "carving what the splats' depth shows empty"
        carved, carved_exact = _coarse_to_fine(depth_distance, axes, hull > -clamp, cancel, lambda f: report(0.7 + 0.3 * f, stage))  # -clamp is final under min()
        passes.append((carved, carved_exact, depth_distance))
    field = _exact_where_the_sign_changes(passes, axes, cancel)  # min over the passes

    # 3. The unseen ends: flat beyond the furthest seen point along the orbit's axis, where no
    #    camera lies beyond it (the underside under a ring above; the top too where it stands above
    #    the cameras; both under a ring through the object's middle).
    centre = origin + 0.5 * voxel * (np.asarray(shape) - 1)
    ends, down = _orbit_ends(viewmats, centre)
    level = None  # the lowest seen point, along down (the overhangs' reference)
    seen = _back_projected(depth, viewmats, Ks) if ends and flat_underside else None  # once for both ends
    for end in ends if flat_underside else []:
        field, end_level = _close_unseen_end(field, depth, seen, viewmats, axes, voxel, centre, end, clamp)
        if end is down:
            level = end_level

    # 4. Hidden undersides of overhangs (a table top's): closed at the height their seen edge says.
    if close_overhangs and down is not None and level is not None:
        field = close_hidden_undersides(field, axes, voxel, viewmats, Ks, W, H, down, level, clamp, cancel)

    # 5. Hidden hollows: a container's inside that no view sees, under a floor only the hull made.
    if open_hollows and down is not None:
        field = open_hidden_hollows(field, axes, voxel, viewmats, Ks, W, H, -down, clamp, cancel)
    values = field.numpy()
    return values, DensityGrid(values=values, origin=origin, voxel=voxel), Silhouettes(cameras, silhouette, depth)


def _close_unseen_end(
    field: torch.Tensor,  # [X, Y, Z] inside-positive, clamped to ±clamp
    depth: torch.Tensor,  # [C, H, W] camera z of the rendered surface (inf: not covered)
    seen: tuple[torch.Tensor, torch.Tensor],  # its pixels back-projected: camera, world coordinates (_back_projected)
    viewmats: torch.Tensor,  # [C, 4, 4]
    axes: list[torch.Tensor],  # grid coordinates per axis
    voxel: float,
    centre: np.ndarray,  # [3] the grid's centre
    end: torch.Tensor,  # [3] unit: away from the cameras, where no view sees
    clamp: float,
) -> tuple[torch.Tensor, float | None]:
    """(the field closed beyond the furthest seen point along `end`, unless a camera lies beyond it
    and sees that end: flat where the object stands on a base there, as its sides curve in where it
    is round; that level, None when nothing is seen)."""
    points, heights = seen[0], seen[1] @ end
    level = _lowest_seen_level(depth, heights)
    if level is None or float((camera_centres(viewmats) @ end).max()) >= level:
        return field, level
    shape = field.shape
    # (sections on a grid of at most 128 a side: a fill per slice costs ~3 ms, and at 256³ the
    # argsort of millions of inside points was a second)
    stride = max(1, math.ceil(max(shape) / 128))
    height = axes[0][:, None, None] * end[0] + axes[1][None, :, None] * end[1] + axes[2][None, None, :] * end[2]
    sections = _Sections.of(field[::stride, ::stride, ::stride], height[::stride, ::stride, ::stride], end, voxel * stride)
    if sections is None:
        return field, level
    band = LEVEL_BAND * 0.5 * voxel * (max(shape) - 1)
    walls = _facing_at_the_lowest_seen(depth, points, heights, level, band) >= WALL_FACING
    if walls or _stands_on_a_base(sections, level, _grazing_slope(viewmats, centre, end, level)):
        return torch.minimum(field, (level - height).clamp(-clamp, clamp)), level
    cap = _rounded_underside(sections, level, height, stride)  # a round end: closed as the sides curve in, not as the hull's cone
    return (torch.minimum(field, cap.clamp(-clamp, clamp)) if cap is not None else field), level


@dataclasses.dataclass
class Silhouettes:
    cameras: Cameras  # the fitted views, at the silhouettes' size
    silhouettes: torch.Tensor  # [C, H, W] the mask or the splats' near-opaque coverage, edge at 1/2
    depths: torch.Tensor  # [C, H, W] the splats' rendered median depth (camera z) where they cover the mask, inf elsewhere


# The views lie to one side of the object when their mean unit direction from it is at least this
# long (a ring 15° up: 0.26; a full sphere of views: ~0).
ONE_SIDED_VIEWS = 0.1
# The cut is made only where the object stands on a base: its section at the lowest seen point is
# at least WIDE_BASE of its widest (measured: mug 0.92, wedge 0.96, a box with 12 cm rounded edges
# 0.71; sphere, bumpy, torus, capsule 0.12-0.26, a sphere seen from 20° up and 1.7 away 0.62), or
# its sections above that point narrow toward it by at most STANDING_SLOPE of the grazing slope
# (radius per height, measured over BASE_RISE of the object's height; the grazing slope is that of
# a wall the shallowest view sees edge-on from the lowest seen point, cot of its elevation: where
# that point is on a limb the sides narrow toward it at nearly that, a wall above a base is seen
# at a slant). Measured on fits from a ring 15° up (grazing slopes 1.8-3.1): standing - mug,
# wedge, table, homer ~0 or below, bunny (a rounded lip at its feet) 0.21; round - a sphere seen
# from 20° up and 1.7 away 0.37, torus 0.69, bumpy 0.73, sphere 0.80, bowl 0.86, capsule 0.88. An
# absolute slope of 0.4 (a share of 0.13-0.22 of these) left the bunny the hull's closure (2.6 dB,
# F 0.03 lost). A teapot's body bulging over a base 3/4 its width (0.39) reads as round by its
# sections (over a few slices its sides narrow as a sphere's do); the walls below take it.
WIDE_BASE = 0.7
STANDING_SLOPE = 0.3
BASE_RISE = 0.05
# ... or where the views see the surface just above the lowest seen point facing them: the median
# |cos| between their rays and its normal (from the rendered depth), within LEVEL_BAND of the
# grid's half-size above that point, is at least WALL_FACING. A limb is seen grazing, and the
# band above it reaches only surface still seen at a slant where the underside's curve is wide
# (a curve tighter than the band - a knot's tube - reads as an edge, and the cut at its lowest
# seen point then errs by less than the band). Measured on the bench fits (docs/benchmarks.md,
# "Walls at the lowest seen point"), from a ring 15° up: round - bowl 0.08, sphere 0.09, bumpy
# 0.11, capsule 0.16, torus 0.18, rounded box 0.24 (standing by its section), quadknot 0.26, vase
# 0.29; walls over a base - teapot 0.56 (a body bulging over a base 3/4 its width, whose sections
# narrow as a sphere's: F 0.880 -> 0.969 with the flat cut), wedge 0.60, bunny 0.62, a block with
# slanted sides and a groove along its base 0.68 (read as round by its sections: F 0.726 ->
# 0.810), mug 0.78, chair 0.81; from 30° up bowl 0.13, sphere 0.08, rounded box 0.23, mug 0.78.
# A wider band reaches further up a round underside: at 0.05 the bowl from 30° read 0.28 and the
# teapot 0.44, at 0.08 0.40 and 0.37.
WALL_FACING = 0.4
LEVEL_BAND = 0.03
# The views surround the object when no two neighbours around the down axis are further apart.
MAX_AZIMUTH_GAP = math.radians(120.0)
# A ring through the object's middle tells down from up by the cameras' up vectors, when their mean
# leans along its axis at least this much (cos): upright cameras, 1; rolled ones say nothing.
UPRIGHT_COS = 0.5
# The lowest seen point is this quantile of the seen points' heights (a stray pixel cannot lower the cut much).
LOWEST_SEEN_QUANTILE = 0.999


def _orbit_ends(
    viewmats: torch.Tensor,  # [C, 4, 4]
    centre: np.ndarray,  # [3] the grid's centre
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(the two unit directions along the axis of a ring of views, down first when it is known;
    which way is down, for the overhangs and hollows). An end is unseen where no camera lies
    beyond the object's furthest seen point along it (`_close_unseen_end` tells).

    A ring above the object (their mean direction from it is not ~0) always hides its underside,
    and its top too where that stands above the cameras (a bottle from SV3D_p's 10°); down is away
    from the cameras. A ring through the object's middle (a turntable at elevation 0, SV3D_u's)
    sees its top and its bottom both edge-on; down is against the cameras' up. Views all round it
    (rings above and below) or on one side only (a single photo, a half-orbit: "away from the
    cameras" is then the object's back) have no ends: none.

    Seen from where the views look (the point nearest their optical axes; the grid's centre when
    they do not meet): from the grid's centre, off the orbit's axis where floaters stretch the
    grid (0.2 to one side, a table fitted from 30° up), the ring leaned 8° and so did every cut."""
    eyes = camera_centres(viewmats)
    focus = _focus(viewmats)
    origin = focus if focus is not None else torch.as_tensor(centre, dtype=torch.float32)
    directions = torch.nn.functional.normalize(eyes - origin, dim=-1)
    side = directions.mean(0)
    if float(side.norm()) >= ONE_SIDED_VIEWS:  # a ring above (or below)
        down = -side / side.norm()
        return ([down, -down], down) if _surround(eyes - origin, down) else ([], None)
    if len(eyes) < 3:
        return [], None
    axis = torch.linalg.svd(eyes - eyes.mean(0)).Vh[-1]  # the normal of the plane the cameras lie in
    if float((directions @ axis).abs().max()) >= ONE_SIDED_VIEWS or not _surround(eyes - origin, axis):
        return [], None  # not one ring: views above and below, or scattered
    up = -viewmats[:, 1, :3].mean(0)  # the cameras' up (image y points down)
    lean = float(up @ axis) / max(float(up.norm()), 1e-12)
    down = (-axis if lean > 0 else axis) if abs(lean) >= UPRIGHT_COS else None
    first = down if down is not None else axis
    return [first, -first], down


def _surround(offsets: torch.Tensor, axis: torch.Tensor) -> bool:
    """Whether cameras at `offsets` [C, 3] from the object surround `axis` [3] (no gap between
    neighbours around it over MAX_AZIMUTH_GAP)."""
    sideways = offsets - (offsets @ axis)[:, None] * axis
    e1 = torch.nn.functional.normalize(sideways[int(torch.argmax(sideways.norm(dim=-1)))], dim=0)
    e2 = torch.linalg.cross(axis, e1)
    azimuths = torch.sort(torch.atan2(sideways @ e2, sideways @ e1)).values
    gaps = torch.diff(torch.cat([azimuths, azimuths[:1] + 2 * math.pi]))
    return float(gaps.max()) <= MAX_AZIMUTH_GAP


def _focus(viewmats: torch.Tensor) -> torch.Tensor | None:
    """[3] the point nearest (least squares) to the cameras' optical axes; None when the axes are
    near parallel (one view, or all looking the same way)."""
    eyes = camera_centres(viewmats).double()
    forward = viewmats[:, 2, :3].double()  # camera +z (the view direction) in world: R's third row
    off_axis = torch.eye(3, dtype=torch.float64) - forward[:, :, None] * forward[:, None, :]  # [C, 3, 3] projectors off each axis
    A, b = off_axis.sum(0), (off_axis @ eyes[:, :, None]).sum(0)[:, 0]
    if float(torch.linalg.eigvalsh(A)[0]) < 0.05 * len(viewmats):
        return None
    return torch.linalg.solve(A, b).float()


def _back_projected(
    depth: torch.Tensor,  # [C, H, W] camera z of the rendered surface (inf: not covered)
    viewmats: torch.Tensor,  # [C, 4, 4]
    Ks: torch.Tensor,  # [C, 3, 3]
) -> tuple[torch.Tensor, torch.Tensor]:
    """([C, H, W, 3] each pixel's centre back-projected to its depth, camera coordinates; [C, H, W, 3]
    the same point in world coordinates). Not finite where the pixel is not covered."""
    C, H, W = depth.shape
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32) + 0.5, torch.arange(W, dtype=torch.float32) + 0.5, indexing="ij")
    f, centre = Ks[:, [0, 1], [0, 1]][:, None, None, :], Ks[:, [0, 1], [2, 2]][:, None, None, :]  # [C, 1, 1, 2]
    points = torch.cat([(torch.stack([u, v], dim=-1) - centre) / f * depth[..., None], depth[..., None]], dim=-1)
    world = torch.einsum("chwi,cij->chwj", points - viewmats[:, None, None, :3, 3], viewmats[:, :3, :3])  # R^T (x - t)
    return points, world


def _lowest_seen_level(
    depth: torch.Tensor,  # [C, H, W] camera z of the rendered surface (inf: not covered)
    heights: torch.Tensor,  # [C, H, W] its pixels' heights along `down` (_back_projected's world points @ down)
) -> float | None:
    """The furthest seen point along `down` (the splats' rendered surface back-projected); None when nothing is seen."""
    seen = heights[torch.isfinite(depth)]
    if len(seen) == 0:
        return None
    return float(np.quantile(seen.numpy(), LOWEST_SEEN_QUANTILE))


def _facing_at_the_lowest_seen(
    depth: torch.Tensor,  # [C, H, W] camera z of the rendered surface (inf: not covered)
    points: torch.Tensor,  # [C, H, W, 3] its pixels back-projected, camera coordinates (_back_projected)
    heights: torch.Tensor,  # [C, H, W] their heights along `down`
    level: float,  # the lowest seen level along `down`
    band: float,  # world units above it
) -> float:
    """Median |cos| between the views' rays and the rendered surface's normal (from the depth's
    differences across neighbouring pixels, one-sided beside uncovered ones) at the seen points
    within `band` above `level`; 0 when there are none. Walls above a base's edge face the views
    there; a round underside's limb is seen grazing."""
    seen = torch.isfinite(depth)
    C, H, W = seen.shape
    c, v, u = torch.nonzero(seen & (heights > level - band), as_tuple=True)  # the few pixels near the level
    tangents, keep = [], torch.ones_like(c, dtype=torch.bool)
    for dv, du in ((0, 1), (1, 0)):  # along rows, along columns
        ends = []
        for sign in (1, -1):
            nv, nu = v + sign * dv, u + sign * du
            inside = (nv >= 0) & (nv < H) & (nu >= 0) & (nu < W)
            nv, nu = nv.clamp(0, H - 1), nu.clamp(0, W - 1)
            has = inside & seen[c, nv, nu]
            ends.append((torch.where(has[:, None], points[c, nv, nu], points[c, v, u]), has))
        (ahead, has_ahead), (behind, has_behind) = ends
        tangents.append(ahead - behind)
        keep &= has_ahead | has_behind
    normal = torch.nn.functional.normalize(torch.linalg.cross(tangents[0][keep], tangents[1][keep]), dim=-1)
    ray = torch.nn.functional.normalize(points[c[keep], v[keep], u[keep]], dim=-1)
    cosines = (normal * ray).sum(-1).abs()
    cosines = cosines[torch.isfinite(cosines)]
    return float(cosines.median()) if len(cosines) else 0.0


@dataclasses.dataclass
class _Sections:
    """The inside points of a field, sliced across `down`: each one's height and cell."""

    heights: torch.Tensor  # [P] along `down`, world units
    cells: torch.Tensor  # [P, 2] across `down`, in grid units, from 0
    offset: torch.Tensor  # [2] what was taken off the cells to start them at 0
    axes: torch.Tensor  # [3, 2] the two directions across `down`
    voxel: float  # the grid's step

    @classmethod
    def of(cls, field: torch.Tensor, height: torch.Tensor, down: torch.Tensor, voxel: float) -> "_Sections | None":
        """From a field [X, Y, Z] (inside-positive) and each grid point's height [X, Y, Z]; None when nothing is inside."""
        inside = torch.nonzero(field > 0)
        if len(inside) == 0:
            return None
        axes = across(down)
        # Cells in grid units (grid points sit at half-integers of the voxel in world units, where rounding splits them unevenly).
        cells = torch.round(inside.float() @ axes).long()
        offset = cells.min(0).values
        return cls(height[tuple(inside.T)], cells - offset, offset, axes, voxel)

    def image(self, top: float) -> np.ndarray:
        """[cells across] bool: the points between `top` and one step below it."""
        chosen = self.cells[(self.heights > top) & (self.heights <= top + self.voxel)]
        image = np.zeros(tuple((self.cells.max(0).values + 1).tolist()), dtype=bool)
        image[chosen[:, 0].numpy(), chosen[:, 1].numpy()] = True
        return image


def _stands_on_a_base(sections: _Sections, level: float, grazing_slope: float) -> bool:
    """Whether the solid stands on a base at `level` (along `down`): its section just above the
    level is most of its widest (a box with rounded edges), or its sections narrow toward the
    level well below `grazing_slope` (a mug's wall: radius per height ~0, a wedge or a cone < 0, a
    bunny's rounded feet at 0.2 of it). A sphere seen from above does neither: the lowest
    seen point is on its limb, where the view grazes it, and its sections narrow toward it at a
    good share of the grazing slope, to a small section.
    Sections count the holes they enclose (a bowl seen from 30° up is carved open down to near its
    bottom, where its section, a full disc among thin rings, would otherwise be the widest and its
    sections would widen toward it), but the one at the level only what it covers (a torus lying
    flat stands on a ring, not on the disc that ring encloses)."""
    voxel, heights = sections.voxel, sections.heights
    low = float(heights.min())
    bins = torch.round((heights - low) / voxel).long()  # grid planes: truncation split a plane between two slices
    count = int(bins.max()) + 1
    step = max(3, round(BASE_RISE * count))
    at_level = int((level - low) / voxel) - 1  # the slice just above the cut
    if at_level - step < 0 or at_level >= count:
        return False
    # The widest is found among every third slice (sections change slowly; a fill costs ~3 ms).
    wanted = sorted(set(range(0, count, 3)) | {at_level, at_level - step})
    slices, plain = _filled_section_areas(bins, sections.cells, wanted)
    if float(plain[at_level]) >= WIDE_BASE * float(slices.max()):  # a torus' ring is not a disc
        return True
    radius = lambda i: math.sqrt(float(slices[i]) / math.pi) * voxel  # noqa: E731 (of a disc of the same area)
    return (radius(at_level - step) - radius(at_level)) / (step * voxel) <= STANDING_SLOPE * grazing_slope


def _grazing_slope(
    viewmats: torch.Tensor,  # [C, 4, 4]
    centre: np.ndarray,  # [3] the grid's centre
    down: torch.Tensor,  # [3]
    level: float,  # the lowest seen point along `down`
) -> float:
    """Radius per height of a wall the shallowest view sees edge-on at the lowest seen point (on
    the axis through `centre`): cot of that view's elevation above it (a ring 15° up and 2.7 away,
    from 0.3 below its centre: 2.6)."""
    eyes = camera_centres(viewmats)
    point = torch.as_tensor(centre, dtype=torch.float32)
    point = point + (level - float(point @ down)) * down
    offsets = eyes - point
    rise = -(offsets @ down)  # [C] height of each camera above the point
    if bool((rise <= 0).any()):
        return math.inf  # a view from level with it or below sees under it: nothing there is hidden
    sideways = (offsets + rise[:, None] * down).norm(dim=-1)
    return float((sideways / rise).max())


def _rounded_underside(
    sections: _Sections,  # of the field every `stride` grid points
    level: float,  # the lowest seen point along `down`
    height: torch.Tensor,  # [X, Y, Z] each fine grid point's height along `down`
    stride: int,
) -> torch.Tensor | None:
    """[X, Y, Z] a field to take the min with: below `level` the object's section there, eroded
    as the circle through it and a section a little higher says (a sphere seen down to 0.3 radii
    above its bottom is closed 0.3 radii below); +inf above `level`. None where the sides do not
    come in there. Eroding by a distance, not scaling, keeps a lying capsule's length and a
    torus' hole."""
    step_voxel = sections.voxel
    coarse_height = height[::stride, ::stride, ::stride]
    rise = max(3, round(BASE_RISE * float(coarse_height.max() - coarse_height.min()) / step_voxel))  # a twentieth of the grid's height
    at_level, above = sections.image(level - step_voxel), sections.image(level - (rise + 1) * step_voxel)
    if not at_level.any() or not above.any():
        return None
    # How fast the sides come in, from the sections' inscribed radii: of the section itself where
    # it has a hole at the level (a torus: its ring's half-width), else of its outline (a bowl open
    # down to near its bottom has thin rings above the full disc at the level).
    outline = scipy.ndimage.binary_fill_holes
    ring = outline(at_level).sum() > 1.05 * at_level.sum()
    inscribed = lambda image: scipy.ndimage.distance_transform_edt(np.pad(image if ring else outline(image), 1)).max() * step_voxel  # noqa: E731
    radius, radius_above = inscribed(at_level), inscribed(above)
    inner = scipy.ndimage.distance_transform_edt(np.pad(at_level, 1))[1:-1, 1:-1]
    if radius_above <= radius:
        return None  # the sides do not come in
    signed = torch.from_numpy((inner - scipy.ndimage.distance_transform_edt(~at_level)) * step_voxel).float()  # + inside
    # The circle (in height, radius) through both sections, centred on the axis: a sphere's or a
    # lying capsule's profile exactly; its centre lies above the level, where the sides come in.
    h0, h1 = level - 0.5 * step_voxel, level - (rise + 0.5) * step_voxel  # the two sections' mid-heights
    centre = 0.5 * (h0 + h1) - (radius_above**2 - radius**2) / (2 * (h0 - h1))
    circle_squared = (h0 - centre) ** 2 + radius**2
    below = height > level
    left = circle_squared - (height[below] - centre) ** 2
    erosion = radius - left.clamp(min=0).sqrt()  # all of the section once the circle closes
    fine = torch.nonzero(below).float() / stride @ sections.axes - sections.offset  # [P, 2] in canvas cells
    canvas = at_level.shape
    grid = torch.stack([(fine[:, 1] + 0.5) / canvas[1] * 2 - 1, (fine[:, 0] + 0.5) / canvas[0] * 2 - 1], dim=-1)
    sampled = torch.nn.functional.grid_sample(
        signed[None, None], grid[None, None], mode="bilinear", padding_mode="border", align_corners=False
    )[0, 0, 0]
    cap = torch.full(height.shape, float("inf"))
    cap[below] = torch.where(left > 0, sampled - erosion, torch.full_like(sampled, -radius - step_voxel))
    return cap


def _filled_section_areas(
    bins: torch.Tensor,  # [P] each inside grid point's slice
    cells: torch.Tensor,  # [P, 2] its cell across the slices (integers from 0)
    wanted: list[int],  # the slices to measure
) -> tuple[torch.Tensor, torch.Tensor]:
    """([slices], [slices]) float: the number of cells each wanted slice covers with the holes it
    encloses, and without them (0 for the slices not wanted)."""
    order = torch.argsort(bins)
    bins, cells = bins[order].numpy(), cells[order].numpy()
    starts = np.searchsorted(bins, np.arange(bins.max() + 2))
    canvas = np.zeros(tuple(cells.max(0) + 1), dtype=bool)
    areas, plain = torch.zeros(len(starts) - 1), torch.zeros(len(starts) - 1)
    for i in wanted:
        cut = cells[starts[i] : starts[i + 1]]
        if len(cut) == 0:
            continue
        canvas[:] = False
        canvas[cut[:, 0], cut[:, 1]] = True
        areas[i] = float(scipy.ndimage.binary_fill_holes(canvas).sum())
        plain[i] = float(canvas.sum())
    return areas, plain


def _slant_margin(
    depth: torch.Tensor,  # [C, H, W] camera z of the rendered surface, inf where none
    Ks: torch.Tensor,  # [C, 3, 3]
    margin: float,  # world units, where the surface faces the view
) -> torch.Tensor:
    """[C, H, W] carving margin: `margin` / cos(slant), at most SLANT_MARGIN_FACTOR * `margin`.

    The slant comes from the depth map's central differences (depth change per lateral world
    unit: pixels times z / f); a pixel without all four neighbours is an outline or a depth
    edge and takes the largest margin.
    """
    known = torch.isfinite(depth)
    padded = torch.nn.functional.pad(torch.where(known, depth, torch.zeros_like(depth))[:, None], (1, 1, 1, 1))[:, 0]
    padded_known = torch.nn.functional.pad(known[:, None].float(), (1, 1, 1, 1))[:, 0] > 0
    dx = (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]) / 2
    dy = (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]) / 2
    neighbours = padded_known[:, 1:-1, 2:] & padded_known[:, 1:-1, :-2] & padded_known[:, 2:, 1:-1] & padded_known[:, :-2, 1:-1]
    focal = Ks[:, 0, 0, None, None].float()
    slope = torch.sqrt(dx**2 + dy**2) * focal / torch.where(known, depth, torch.ones_like(depth))
    widened = margin * torch.sqrt(1 + slope**2)  # margin / cos(slant)
    largest = SLANT_MARGIN_FACTOR * margin
    return torch.where(known & neighbours, widened.clamp(max=largest), torch.full_like(depth, largest))


def _half_width(
    mask: torch.Tensor,  # [C, H, W] the views' masks in [0, 1]
    depth: torch.Tensor,  # [C, H, W] camera z of the rendered surface, inf where none
    Ks: torch.Tensor,  # [C, 3, 3]
    reach: float,  # world units: how far around a pixel the half-width is looked for
) -> torch.Tensor:
    """[C, H, W] world units: the silhouette's half-width near each pixel, the largest distance to
    its outline within `reach` of it (a leg's radius on the leg, at least `reach` inside a body)."""
    known = torch.isfinite(depth)
    typical = float(depth[known].median()) if bool(known.any()) else 1.0
    window = 2 * max(1, math.ceil(reach * float(Ks[:, 0, 0].mean()) / typical)) + 1  # pixels
    inside = (mask >= 0.5).numpy()
    pixels = np.full(inside.shape, np.inf)  # a view with no outline (the object fills it) caps nothing
    for c, m in enumerate(inside):
        if not m.all():  # the frame's edge is no outline: the part may go on beyond it
            distance = scipy.ndimage.distance_transform_edt(np.pad(m, 1, constant_values=True))[1:-1, 1:-1]
            pixels[c] = scipy.ndimage.maximum_filter(distance, size=window)
    world = torch.from_numpy(pixels).float() * depth / Ks[:, 0, 0, None, None].float()
    return torch.where(known, world, torch.full_like(depth, math.inf))  # no depth there: nothing to cap


def _median_filter(
    maps: torch.Tensor,  # [C, H, W]
    known: torch.Tensor,  # [C, H, W] where the maps hold a value
    size: int,  # the neighbourhood's side (odd)
) -> torch.Tensor:
    """Median of each pixel's size x size neighbourhood, unknown neighbours replaced by the pixel
    itself; one view at a time (size² copies of a view in memory, not of all of them)."""
    C, H, W = maps.shape
    r = size // 2
    out = maps.clone()
    for c in range(C):
        centre = torch.where(known[c], maps[c], torch.zeros_like(maps[c]))
        padded = torch.nn.functional.pad(torch.where(known[c], maps[c], torch.full_like(maps[c], float("nan")))[None, None], (r, r, r, r), value=float("nan"))
        patches = torch.nn.functional.unfold(padded, size).view(size * size, H, W)
        patches = torch.where(torch.isnan(patches), centre[None].expand_as(patches), patches)
        out[c] = torch.where(known[c], patches.median(dim=0).values, maps[c])
    return out


def _coarse_to_fine(
    evaluate: Callable[[torch.Tensor], torch.Tensor],  # world points [P, 3] -> values [P]
    axes: list[torch.Tensor],  # the grid's coordinates per axis
    wanted: torch.Tensor | None,  # [X, Y, Z] the points whose value is used (None: all)
    cancel: Callable[[], bool] | None,
    report: Callable[[float], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """([X, Y, Z] values of `evaluate` on the grid, [X, Y, Z] where they are exact).

    Every other grid point is evaluated first; a point whose coarse neighbours (within one coarse
    step: two to three grid steps) all lie on the same side of the surface takes the nearest one's
    value, the rest - the band around the surface - are evaluated. Signs are right wherever no
    part thinner than two grid steps slips between coarse points (a sub-pixel part at 128² views);
    values are not, so `_exact_where_the_sign_changes` evaluates the few approximate points that
    end up next to the surface. Unwanted points are +inf (no effect under min()).
    """
    shape = tuple(len(a) for a in axes)
    flat = torch.arange(int(np.prod(shape))).view(shape)
    coarse_index = flat[::2, ::2, ::2]
    coarse = _values_at(evaluate, axes, coarse_index.reshape(-1), cancel, lambda f: report(0.3 * f)).view(coarse_index.shape)
    inside = coarse > 0
    unsettled = dilate(inside) & dilate(~inside)  # coarse points with a neighbour on the other side
    up = [torch.arange(n) // 2 for n in shape]  # fine index -> the coarse point at or before it
    field = coarse[up[0][:, None, None], up[1][None, :, None], up[2][None, None, :]]
    exact = unsettled[up[0][:, None, None], up[1][None, :, None], up[2][None, None, :]]
    if wanted is not None:
        exact &= wanted
        field = torch.where(wanted, field, torch.full_like(field, float("inf")))
    index = flat[exact]
    field.view(-1)[index] = _values_at(evaluate, axes, index, cancel, lambda f: report(0.3 + 0.7 * f))
    exact.view(-1)[coarse_index.reshape(-1)] = True
    if wanted is not None:
        exact |= ~wanted
    return field, exact


def _values_at(evaluate, axes: list[torch.Tensor], index: torch.Tensor, cancel, report) -> torch.Tensor:
    """evaluate() at the grid points of flat indices [P], in batches -> [P]."""
    shape = tuple(len(a) for a in axes)
    out = torch.empty(len(index), dtype=torch.float32)
    for start in range(0, len(index), POINTS_PER_BATCH):
        report(start / max(1, len(index)))
        check_cancel(cancel)
        part = index[start : start + POINTS_PER_BATCH]
        i, rest = part // (shape[1] * shape[2]), part % (shape[1] * shape[2])
        j, k = rest // shape[2], rest % shape[2]
        out[start : start + len(part)] = evaluate(torch.stack([axes[0][i], axes[1][j], axes[2][k]], dim=-1))
    return out


def _exact_where_the_sign_changes(
    passes: list[tuple[torch.Tensor, torch.Tensor, Callable]],  # (values, exact, evaluate) per pass, values updated in place
    axes: list[torch.Tensor],
    cancel: Callable[[], bool] | None,
) -> torch.Tensor:
    """[X, Y, Z] min over the passes' values. Marching cubes reads values only at the ends of
    edges that cross the surface: every such point is made exact in every pass (a few thousand
    points), until no approximate one is left there. After the first round only the edges at the
    points just corrected can have changed (a full scan of 256³ each round cost ~1 s)."""
    field = passes[0][0].clone()
    exact = passes[0][1].clone()
    for values, known, _ in passes[1:]:
        torch.minimum(field, values, out=field)
        exact &= known
    shape = field.shape
    strides = (shape[1] * shape[2], shape[2], 1)
    todo = _edge_ends_across_the_surface(field > 0) & ~exact
    for _ in range(16):  # each round adds the few points its own corrections moved the surface next to
        if not bool(todo.any()):
            break
        index = torch.nonzero(todo.view(-1)).squeeze(-1)
        for values, known, evaluate in passes:
            missing = index[~known.view(-1)[index]]
            values.view(-1)[missing] = _values_at(evaluate, axes, missing, cancel, lambda f: None)
            known.view(-1)[missing] = True
        exact.view(-1)[index] = True
        field.view(-1)[index] = torch.stack([values.view(-1)[index] for values, _, _ in passes]).amin(0)
        # The edges from the corrected points to their six neighbours: ends of those that cross.
        todo = torch.zeros_like(exact)
        coords = [index // strides[0], index // strides[1] % shape[1], index % shape[2]]
        inside = field.view(-1)[index] > 0
        for axis in range(3):
            for step in (-1, 1):
                ok = (coords[axis] + step >= 0) & (coords[axis] + step < shape[axis])
                neighbour = index[ok] + step * strides[axis]
                crosses = (field.view(-1)[neighbour] > 0) != inside[ok]
                todo.view(-1)[index[ok][crosses]] = True
                todo.view(-1)[neighbour[crosses]] = True
        todo &= ~exact
    return field


def _edge_ends_across_the_surface(inside: torch.Tensor) -> torch.Tensor:
    """[X, Y, Z] bool: both ends of every grid edge whose ends differ in sign."""
    crossing = torch.zeros_like(inside)
    for axis in range(3):
        n = inside.shape[axis]
        differs = inside.narrow(axis, 1, n - 1) != inside.narrow(axis, 0, n - 1)
        crossing.narrow(axis, 1, n - 1).logical_or_(differs)
        crossing.narrow(axis, 0, n - 1).logical_or_(differs)
    return crossing


def _min_over_views(
    points: torch.Tensor,  # [P, 3] float32 world
    viewmats: torch.Tensor,  # [C, 4, 4]
    Ks: torch.Tensor,  # [C, 3, 3]
    maps: torch.Tensor,  # [C, H, W] per-view map, sampled bilinearly at each point's pixel
    clamp: float,
    value: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],  # (view, z, sampled, grid [P, 2]) -> [P]
) -> torch.Tensor:
    """min over views of value(...), clamped to ±clamp. A point at -clamp is settled (the min
    cannot change), so later views only visit the points still undecided."""
    C, H, W = maps.shape
    out = torch.empty(points.shape[0], dtype=torch.float32)
    index, current = torch.arange(points.shape[0]), torch.full((points.shape[0],), clamp, dtype=torch.float32)
    for c in range(C):
        z, u, v = project(points, viewmats[c], Ks[c])
        grid = torch.stack([u * (2 / W) - 1, v * (2 / H) - 1], dim=-1)  # grid_sample's align_corners=False
        sampled = torch.nn.functional.grid_sample(
            maps[c][None, None], grid[None, None], mode="bilinear", padding_mode="border", align_corners=False
        )[0, 0, 0]
        current = torch.minimum(current, value(c, z, sampled, grid).clamp(-clamp, clamp))
        settled = current <= -clamp
        # Set the settled points aside once there are enough of them to pay for the copy.
        if c + 1 < C and int(settled.sum()) * 4 > len(current):
            out[index[settled]] = current[settled]
            keep = ~settled
            index, points, current = index[keep], points[keep], current[keep]
    out[index] = current
    return out


def _thin_parts(
    silhouettes: torch.Tensor,  # [C, H, W] edge at 1/2
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([C, H, W] the silhouettes raised by THIN_LIFT on parts under three pixels wide; [C, H, W]
    1 on those parts grown by a pixel, else 0 - None when no view has any)."""
    square = np.ones((3, 3), bool)
    lifted, thin = [], []
    for view in silhouettes.numpy():
        body = scipy.ndimage.binary_dilation(scipy.ndimage.binary_opening(view >= 0.5, square), square)
        part = (view >= 0.5 - THIN_LIFT) & ~body
        lifted.append(np.where(part, view + THIN_LIFT, view))
        thin.append(scipy.ndimage.binary_dilation(part, square))
    if not any(t.any() for t in thin):
        return silhouettes, None
    return torch.from_numpy(np.stack(lifted)).float(), torch.from_numpy(np.stack(thin)).float()


def _silhouette_distance(
    points: torch.Tensor,  # [P, 3] float32 world
    viewmats: torch.Tensor,  # [C, 4, 4]
    Ks: torch.Tensor,  # [C, 3, 3]
    silhouettes: torch.Tensor,  # [C, H, W] edge at 1/2
    lifted: torch.Tensor,  # [C, H, W] the same, raised on thin parts (_thin_parts)
    thin: torch.Tensor | None,  # [C, H, W] 1 on thin parts; None: there are none
    clamp: float,
) -> torch.Tensor:
    """min over views of how far inside the silhouettes each point projects (world units, +
    inside); through the raised ones where the point lies in thin parts in THIN_VIEWS of the views."""

    def inside(c, z, m, grid):
        m = torch.where((grid.abs() <= 1).all(-1), m, torch.full_like(m, -0.5))  # outside the image: nothing of the object
        # The soft mask ramps over about a pixel at its edge: (m - 1/2) * 2 pixels ~ signed distance.
        return m * 2 * (z / Ks[c, 0, 0])

    plain = _min_over_views(points, viewmats, Ks, silhouettes - 0.5, clamp, inside)
    if thin is None:
        return plain
    chosen = _in_thin_parts(points, viewmats, Ks, thin)
    if not bool(chosen.any()):
        return plain
    plain[chosen] = _min_over_views(points[chosen], viewmats, Ks, lifted - 0.5, clamp, inside)
    return plain


def _in_thin_parts(
    points: torch.Tensor,  # [P, 3] float32 world
    viewmats: torch.Tensor,  # [C, 4, 4]
    Ks: torch.Tensor,  # [C, 3, 3]
    thin: torch.Tensor,  # [C, H, W] 1 on thin parts (_thin_parts)
) -> torch.Tensor:
    """[P] bool: the points that lie in thin parts in at least THIN_VIEWS of the views."""
    views_thin = torch.zeros(points.shape[0])
    for c in range(len(viewmats)):
        _, u, v = project(points, viewmats[c], Ks[c])
        grid = torch.stack([u * (2 / thin.shape[2]) - 1, v * (2 / thin.shape[1]) - 1], dim=-1)
        views_thin += torch.nn.functional.grid_sample(thin[c][None, None], grid[None, None], mode="nearest", align_corners=False)[0, 0, 0]
    return views_thin >= THIN_VIEWS * len(viewmats)


def _depth_distance(
    points: torch.Tensor,  # [P, 3] float32 world
    viewmats: torch.Tensor,  # [C, 4, 4]
    Ks: torch.Tensor,  # [C, 3, 3]
    depth: torch.Tensor,  # [C, H, W] carving depth, camera z (0: nothing)
    thin: torch.Tensor | None,  # [C, H, W] 1 on thin parts (_thin_parts); None: there are none
    clamp: float,
) -> torch.Tensor:
    """min over views of how far behind each view's carving depth each point is; points in thin
    parts in THIN_VIEWS of the views are not carved (+clamp): their silhouettes shape them."""
    behind = _min_over_views(points, viewmats, Ks, depth, clamp, lambda c, z, surface, grid: z - surface)
    carved = behind < clamp  # (only these can change: most points lie far behind every view's depth)
    if thin is None or not bool(carved.any()):
        return behind
    spared = torch.zeros_like(carved)
    spared[carved] = _in_thin_parts(points[carved], viewmats, Ks, thin)
    return torch.where(spared, torch.full_like(behind, clamp), behind)


def _front_depth(
    field: torch.Tensor,  # [X, Y, Z] inside-positive
    origin: np.ndarray,
    voxel: float,
    viewmats: torch.Tensor,  # [C, 4, 4]
    Ks: torch.Tensor,  # [C, 3, 3]
    width: int,
    height: int,
) -> torch.Tensor:
    """[C, H, W] camera depth of the nearest inside voxel per pixel (inf where none projects).

    Voxel centres are z-buffered; a pixel takes the nearest of its 3x3 neighbourhood (pixels
    between centres), which errs toward the camera: fewer concavities, never more.
    """
    inside = field > 0
    # Only the hull's shell can be nearest to a camera: inside voxels with an outside neighbour.
    shell = inside & dilate(~inside)
    occupied = torch.nonzero(shell).float() * voxel + torch.as_tensor(origin, dtype=torch.float32)
    C = viewmats.shape[0]
    out = torch.full((C, height * width), float("inf"))
    for c in range(C):
        for start in range(0, occupied.shape[0], POINTS_PER_BATCH):
            z, u, v = project(occupied[start : start + POINTS_PER_BATCH], viewmats[c], Ks[c])
            u, v = torch.floor(u).long(), torch.floor(v).long()
            ok = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
            out[c].scatter_reduce_(0, v[ok] * width + u[ok], z[ok], reduce="amin")
    out = out.view(C, 1, height, width)
    return -torch.nn.functional.max_pool2d(-out, 3, stride=1, padding=1)[:, 0]
