"""Hidden hollows: open a container's inside that no view sees (step 4 of the views' hull).

    field = open_hidden_hollows(field, axes, voxel, viewmats, Ks, width, height, up)

From a ring of views 15° above a bowl, nothing below the rays that graze its near rim is seen by
any view, so the hull keeps that volume filled: a dome inside the bowl (bench F 0.666). No view
says the space is empty; the shape around it does. The dome is a *hidden floor*: hull surface
that faces the cameras (it faces up) yet no view sees it well (the near wall hides it), lying in
a pit (just above it, the object surrounds it on every side). A solid's top is seen, or, seen
only grazing, lies in no pit; its underside and the space under a table top face away.

Under a hidden floor wider than two walls, the hidden space is opened: what lies more than a
wall's thickness from every surface the views show (the hidden floor is not one of them),
connected to the floor. The wall is as thick as the views show the object's thin walls to be
(both faces seen), at most HOLLOW_WALL. Nothing else is touched: a solid's core, however deep,
connects to no hidden floor.

A hollow is a coarse feature (its walls are several voxels thick), so it is found on a grid of at
most HOLLOW_GRID a side (a 192³ field whole, every other point of a 256³ one) and the opening,
a smooth distance field, is interpolated back: a few tenths of a second to 1.6 s, most of it
skipped when no floor is hidden.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import scipy.ndimage
import torch

from im3d.errors import check_cancel
from im3d.mesh.voxels import across, camera_centres, dilate, project

# A surface faces a view when the cosine between its normal and the direction to the camera
# exceeds FACING_COS (78°); the view sees it *well* when it is also nearest to that camera at its
# pixel and the cosine exceeds SEEN_COS (70°). Surfaces seen only grazing are not known from the
# views (a dome just under the rays over a rim is "visible" within a pixel at 75°).
FACING_COS = 0.2
SEEN_COS = 0.35
# A hidden floor faces up (away from `down`) within 60°.
FLOOR_COS = 0.5
# Hollows keep walls at most this thick (share of the grid's half-size; a 1.1-wide grid: ~2.8 cm),
# and are opened only under hidden floors wider than twice that (a crevice is not a container).
HOLLOW_WALL = 0.05
# Thickness is measured across walls: through shell voxels whose normal is within 60° of level.
SIDE_COS = 0.5
# ... and at least this many voxels (marching cubes needs two grid points across a wall).
MIN_WALL = 2.0
# Hollows are found on a grid of at most this many points a side (a Euclidean distance transform
# at 256³ takes ~6 s on 2 cores; at 128³ ~0.7 s). 192 keeps a 192³ field whole: every other point
# of it, 96³, opened the bowl worse (F 0.774 against 0.905).
HOLLOW_GRID = 192


def open_hidden_hollows(
    field: torch.Tensor,  # [X, Y, Z] inside-positive, clamped to ±clamp
    axes: list[torch.Tensor],  # grid coordinates per axis
    voxel: float,
    viewmats: torch.Tensor,  # [C, 4, 4] the fitted views
    Ks: torch.Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    up: torch.Tensor,  # [3] toward the cameras' side (the views form a ring above the object)
    clamp: float,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """The field with the space under hidden floors opened (unchanged when there are none)."""
    stride = max(1, math.ceil(max(field.shape) / HOLLOW_GRID))
    coarse = field[::stride, ::stride, ::stride]
    opening = _opening(coarse, [a[::stride] for a in axes], voxel * stride, viewmats, Ks, width, height, up, cancel)
    if opening is None:
        return field
    if stride > 1:  # a smooth distance: trilinear is exact enough on the fine grid
        # Coarse point i is fine point i * stride; past the last one, the values are repeated.
        spanned = tuple((n - 1) * stride + 1 for n in opening.shape)
        opening = torch.nn.functional.interpolate(opening[None, None], size=spanned, mode="trilinear", align_corners=True)
        pad = [p for n, m in zip(reversed(field.shape), reversed(spanned)) for p in (0, n - m)]
        opening = torch.nn.functional.pad(opening, pad, mode="replicate")[0, 0]
    return torch.minimum(field, opening.clamp(-clamp, clamp))


def _opening(
    field: torch.Tensor,  # [X, Y, Z] inside-positive
    axes: list[torch.Tensor],
    voxel: float,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    up: torch.Tensor,
    cancel: Callable[[], bool] | None,
) -> torch.Tensor | None:
    """[X, Y, Z] a field to take the min with (negative in the hollows, positive around them and
    far above any clamp elsewhere: finite, so that it interpolates), or None where no hidden floor
    opens anything."""
    inside = field > 0
    index, points, normals = shell_voxels(field, axes, voxel)
    if len(index) == 0:
        return None
    origin = torch.tensor([float(a[0]) for a in axes])
    nearest = nearest_depths(points, viewmats, Ks, width, height)  # [C, H * W]
    # Hidden floors first (few shell voxels face up), the rest of the shell only when there are some.
    upward = torch.nonzero(normals @ up > FLOOR_COS).squeeze(-1)
    faced, seen = faced_and_seen(points[upward], normals[upward], viewmats, Ks, nearest, width, height, voxel)
    candidates = upward[faced & ~seen]  # faces a camera, no camera sees it well
    wall_voxels = HOLLOW_WALL * 0.5 * (max(field.shape) - 1)
    floors = candidates[_in_a_pit(points[candidates], normals[candidates], up, inside, origin, voxel, wall_voxels)]
    if len(floors) == 0:
        return None
    check_cancel(cancel)
    faced, seen = faced_and_seen(points, normals, viewmats, Ks, nearest, width, height, voxel)
    hidden = faced & ~seen

    # Distances (voxels) to the surfaces the views show: hidden shell voxels are no walls.
    walls = WallDistance.of(index[~hidden], normals[~hidden], field.shape)
    check_cancel(cancel)
    # Only straight under the floors: below a torus' filled hole lie its tubes' cores as well,
    # as far from any seen wall, and connected to it.
    under = _under_the_floors(index[floors], up, field.shape)
    labels, _ = scipy.ndimage.label((inside & under & (walls.distance > wall_voxels)).numpy())
    labels = torch.from_numpy(labels)
    floor_labels = labels[tuple(index[floors].T)]
    hollow_labels = torch.unique(floor_labels[floor_labels > 0])
    if len(hollow_labels) == 0:
        return None  # every hidden floor narrower than two walls
    hollow = torch.isin(labels, hollow_labels)

    # Walls as thick as the views show thin walls to be near the hollow, at most wall_voxels. The
    # hollow grows into what that frees, and into what lies in front of a seen wall (a ledge the
    # hidden floor left along a seen inside wall: that space is seen empty, however near).
    side = seen & ((normals @ up).abs() < SIDE_COS)
    thickness = _seen_wall_thickness(index[side], normals[side], inside, hollow, wall_voxels)
    for _ in range(math.ceil(2 * wall_voxels) + 2):
        check_cancel(cancel)
        grown = torch.nonzero(dilate(hollow) & inside & under & ~hollow)
        grown = grown[(walls.distance[tuple(grown.T)] > thickness) | walls.in_front(grown)]
        if len(grown) == 0:
            break
        hollow[tuple(grown.T)] = True
    # The hollow and a band around it (where its new surface lies, and so that interpolation to a
    # finer grid stays off the rest of the object): inside the hollow negative, the walls positive.
    band = torch.nonzero(dilate(dilate(hollow)))
    in_front = walls.in_front(band)
    distance = walls.distance[tuple(band.T)]
    opening = torch.full(field.shape, float(max(field.shape)) * voxel)
    value = torch.where(in_front, 0.5 - distance, thickness - distance)
    opening[tuple(band.T)] = torch.where(hollow[tuple(band.T)], value, value.clamp(min=0.5)) * voxel  # only the hollow opens
    return opening


def _under_the_floors(
    floors: torch.Tensor,  # [F, 3] grid indices of the hidden floors' voxels
    up: torch.Tensor,  # [3]
    shape: tuple[int, ...],
) -> torch.Tensor:
    """[X, Y, Z] bool: grid points whose column along `up` passes through the floors' footprint
    (the floors' cells across `up`, one cell grown, holes filled)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"), dim=-1)
    cells = torch.round(grid @ across(up)).long()  # [X, Y, Z, 2]
    low = cells.view(-1, 2).min(0).values
    cells = cells - low
    footprint = np.zeros(tuple((cells.view(-1, 2).max(0).values + 1).tolist()), dtype=bool)
    floor_cells = cells[tuple(floors.T)]
    footprint[floor_cells[:, 0].numpy(), floor_cells[:, 1].numpy()] = True
    footprint = scipy.ndimage.binary_fill_holes(scipy.ndimage.binary_dilation(footprint, np.ones((3, 3), dtype=bool)))
    return torch.from_numpy(footprint)[cells[..., 0], cells[..., 1]]


def shell_voxels(
    field: torch.Tensor,  # [X, Y, Z] inside-positive
    axes: list[torch.Tensor],  # its grid coordinates per axis
    voxel: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inside grid points with an outside neighbour: ([B, 3] indices, [B, 3] world points, [B, 3] outward normals)."""
    inside = field > 0
    index = torch.nonzero(inside & dilate(~inside))
    origin = torch.tensor([float(a[0]) for a in axes])
    return index, index.float() * voxel + origin, outward_normals(field, index)


def outward_normals(field: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, 3] unit outward normals (minus the central-difference gradient) at grid points [B, 3]."""
    shape = torch.tensor(field.shape)
    gradient = []
    for axis in range(3):
        step = torch.zeros(3, dtype=torch.long)
        step[axis] = 1
        ahead = torch.minimum(index + step, shape - 1)
        behind = torch.clamp(index - step, min=0)
        gradient.append(field[tuple(ahead.T)] - field[tuple(behind.T)])
    return torch.nn.functional.normalize(-torch.stack(gradient, dim=-1), dim=-1)


def nearest_depths(
    points: torch.Tensor,  # [B, 3] the hull's shell voxels
    viewmats: torch.Tensor,  # [C, 4, 4]
    Ks: torch.Tensor,  # [C, 3, 3]
    width: int,
    height: int,
) -> torch.Tensor:
    """[C, H * W] the shell's own z-buffer per view: each voxel covers the 2x2 pixels around its
    projection (a min over pixel neighbourhoods), so the shell leaves no holes between voxels."""
    out = torch.full((len(viewmats), height * width), float("inf"))
    for c in range(len(viewmats)):
        z, u, v = project(points, viewmats[c], Ks[c])
        pu, pv = torch.floor(u - 0.5).long(), torch.floor(v - 0.5).long()  # the top-left pixel of the 2x2
        ok = (z > 0) & (pu >= -1) & (pu < width) & (pv >= -1) & (pv < height)
        padded = torch.full(((height + 1) * (width + 1),), float("inf"))
        padded.scatter_reduce_(0, ((pv + 1) * (width + 1) + pu + 1)[ok], z[ok], reduce="amin")
        padded = -torch.nn.functional.max_pool2d(-padded.view(1, height + 1, width + 1), 2, stride=1)
        out[c] = padded.reshape(-1)
    return out


def faced_and_seen(
    points: torch.Tensor,  # [B, 3] shell voxels
    normals: torch.Tensor,  # [B, 3]
    viewmats: torch.Tensor,  # [C, 4, 4]
    Ks: torch.Tensor,  # [C, 3, 3]
    nearest: torch.Tensor,  # [C, H * W] the whole shell's z-buffers
    width: int,
    height: int,
    voxel: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] faces some camera, [B] some camera sees it well). A voxel is nearest to a camera when
    it lies within two pixels' (or voxels') depth of the shell's z-buffer at its pixel."""
    eyes = camera_centres(viewmats)
    faced = torch.zeros(len(points), dtype=torch.bool)
    seen = torch.zeros_like(faced)
    for c in range(len(viewmats)):
        z, u, v = project(points, viewmats[c], Ks[c])
        pu, pv = torch.floor(u).long(), torch.floor(v).long()
        ok = (z > 0) & (pu >= 0) & (pu < width) & (pv >= 0) & (pv < height)
        pixel = pv.clamp(0, height - 1) * width + pu.clamp(0, width - 1)
        tolerance = 2 * torch.clamp(z / Ks[c, 0, 0], min=voxel)
        cosine = (normals * torch.nn.functional.normalize(eyes[c] - points, dim=-1)).sum(-1)
        faced |= ok & (cosine > FACING_COS)
        seen |= ok & (cosine > SEEN_COS) & (z <= nearest[c, pixel] + tolerance)
    return faced, seen


def _in_a_pit(
    points: torch.Tensor,  # [P, 3] hidden shell voxels facing up
    normals: torch.Tensor,  # [P, 3]
    up: torch.Tensor,  # [3]
    inside: torch.Tensor,  # [X, Y, Z]
    origin: torch.Tensor,  # [3]
    voxel: float,
    rise: float,  # voxels above the surface the surrounding walls must reach
) -> torch.Tensor:
    """[P] bool: from a point outside, `rise` voxels above each, rays in eight directions across
    `up` all meet the object (the inside of a bowl); over a top, some leave it (a solid's top)."""
    shape = torch.tensor(inside.shape)

    def voxel_of(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ijk = torch.round((p - origin) / voxel).long()
        within = ((ijk >= 0) & (ijk < shape)).all(-1)
        ijk = torch.minimum(ijk.clamp(min=0), shape - 1)
        return within, inside[tuple(ijk.T)]

    start = points + voxel * (2 * normals + rise * up)
    within, occupied = voxel_of(start)
    surrounded = within & ~occupied
    e1, e2 = across(up).T
    for k in range(8):
        direction = math.cos(k * math.pi / 4) * e1 + math.sin(k * math.pi / 4) * e2
        active = torch.nonzero(surrounded).squeeze(-1)  # still surrounded, ray not yet blocked
        met = torch.zeros(len(points), dtype=torch.bool)
        for step in range(1, int(shape.max())):
            if len(active) == 0:
                break
            within, occupied = voxel_of(start[active] + step * voxel * direction)
            met[active[within & occupied]] = True
            active = active[within & ~occupied]
        surrounded &= met
    return surrounded


@dataclasses.dataclass
class WallDistance:
    """Euclidean distances to the walls (the shell voxels the views show), and which side of
    its nearest wall each grid point lies on."""

    distance: torch.Tensor  # [X, Y, Z] voxels to the nearest wall voxel (0 on walls)
    nearest: torch.Tensor  # [3, X, Y, Z] the nearest wall voxel's index
    normal: torch.Tensor  # [X, Y, Z, 3] outward normals of the wall voxels (0 elsewhere)

    @classmethod
    def of(cls, index: torch.Tensor, normals: torch.Tensor, shape: tuple[int, ...]) -> "WallDistance":
        """From wall voxels' grid indices [W, 3] and outward normals [W, 3] on a grid of `shape`."""
        open_space = np.ones(shape, dtype=bool)
        open_space[tuple(index.T.numpy())] = False
        distance, nearest = scipy.ndimage.distance_transform_edt(open_space, return_indices=True)
        normal = torch.zeros(*shape, 3)
        normal[tuple(index.T)] = normals
        return cls(torch.from_numpy(distance.astype(np.float32)), torch.from_numpy(nearest.astype(np.int64)), normal)

    def in_front(self, index: torch.Tensor) -> torch.Tensor:
        """[P] bool: grid points [P, 3] lie on the outer side of their nearest wall (seen empty)."""
        wall = self.nearest[:, index[:, 0], index[:, 1], index[:, 2]]  # [3, P]
        return ((index - wall.T).float() * self.normal[tuple(wall)]).sum(-1) > 0


def _seen_wall_thickness(
    seen: torch.Tensor,  # [S, 3] grid indices of shell voxels the views see well
    normals: torch.Tensor,  # [S, 3] their outward normals
    inside: torch.Tensor,  # [X, Y, Z]
    hollow: torch.Tensor,  # [X, Y, Z] the space to open
    most: float,  # voxels
) -> float:
    """Median thickness (voxels) of the walls the views see on both sides around the hollow: from
    each seen voxel within `most` of the hollow's box, inward until the object is left, where that
    happens within twice `most` (a rim, a wall above the hollow); `most` when none does."""
    box = torch.nonzero(hollow)
    low, high = box.min(0).values - most - 2, box.max(0).values + most + 2
    near = ((seen >= low) & (seen <= high)).all(-1)
    start, direction = seen[near].float(), -normals[near]
    shape = torch.tensor(inside.shape)
    through = torch.full((len(start),), float("nan"))
    active = torch.arange(len(start))
    for step in range(1, math.ceil(2 * most) + 1):
        ijk = torch.round(start[active] + step * direction[active]).long()
        within = ((ijk >= 0) & (ijk < shape)).all(-1)
        ijk = torch.minimum(ijk.clamp(min=0), shape - 1)
        left = ~within | ~inside[tuple(ijk.T)]
        through[active[left]] = step
        active = active[~left]
    measured = through[~torch.isnan(through)]
    return float(min(most, max(MIN_WALL, measured.median()))) if len(measured) else most
