"""Hidden undersides of overhangs: close a table top's underside at its seen edge (a step of the views' hull).

    field = close_hidden_undersides(field, axes, voxel, viewmats, Ks, width, height, down, level, clamp)

From a ring of views above a table no view sees the underside of its top: rays that pass under
the near edge descend (at the views' elevation) away from it, so the hull keeps a tent of volume
hanging under the top, a quarter of the top's half-width deep from 15° up (all of the bench
table's F-score loss: 0.22 of its surface; a chair's seat the same). No view says that space is
full, and the shape around it says where the underside is: it starts where the views see the
top's side end, and a slab's underside goes on at that height.

A *hidden underside* is hull surface that faces down (away from the cameras), that no view sees
well, and that lies above the lowest seen point (the object's base is step 3's). A large
connected piece of it is closed when the seen surface it meets

- faces the views (a slab's side, seen square on; not a round belly seen down to its limb), and
- ends level: where the piece meets the seen edge (seen voxels with no seen voxel below them: a
  leg's side goes on down past the piece), the hull's surface lies at one height, within a few
  voxels (where a mug's handle meets its body or a knot's tubes cross, it climbs).

Each column under the piece is then opened from the hidden surface up to that height - the
median of the piece's surface along the seen edge, between grid points - where the object goes
on above it (a thin bar over the hidden surface - a handle - is left whole). The cut is a plane,
exact on the full grid; the pieces are found on a grid of at most UNDERSIDE_GRID a side.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import scipy.ndimage
import torch

from im3d.errors import check_cancel
from im3d.mesh.hollows import FLOOR_COS, faced_and_seen, nearest_depths, shell_voxels
from im3d.mesh.voxels import camera_centres, dilate

# Found on a grid of at most this many points a side (the grid hollows use).
UNDERSIDE_GRID = 192
# Hidden undersides lie above the lowest seen point by at least this share of the grid's half-size
# (step 3 closes what lies beyond it).
ABOVE_LEVEL = 0.03
# An overhang stands clear of the base: the cut lies at least this share of the grid's half-size
# above the lowest seen point (~0.14 on the bench's objects, a metre across: a table's top is 0.60
# above it, a chair's seat 0.47; a sitting rabbit's round belly, seen down to its haunches 0.09
# above its base, where the hull's tent hugs it: cut flat there it lost 1.4 dB).
CLEARANCE = 0.25
# The seen surface a piece meets faces the views at least this much: the median over its voxels
# of the largest cosine between the voxel's normal and the direction to a camera. Measured: a
# table top's side 0.82, a chair seat's 0.73; the limbs above the large pieces under round bodies
# (vase, bumpy sphere, sphere, bowl) 0.43-0.59.
ATTACHED_FACING = 0.6
# The seen edge runs level: the hull's surface where the piece meets it lies within this many
# (coarse) voxels in height, 10th to 90th percentile (the grid's steps are most of that spread).
# Measured: a table top's and a chair seat's edges 1.8-3.0; where a mug's handle meets its body
# or a knot's tubes cross, the edges around hidden surface climb: 6.4 and more.
LEVEL_EDGE = 4.5
# Pieces of hidden underside smaller than this share of the grid's cross-section are left alone
# (22 x 22 voxels of a 128 grid: a ledge, a crease or a fit's dent, not a slab; pieces of 40-280
# voxels on the public models were cut by a voxel or two, changing F by 0.002 at most).
MIN_PIECE = 0.03


def close_hidden_undersides(
    field: torch.Tensor,  # [X, Y, Z] inside-positive, clamped to ±clamp
    axes: list[torch.Tensor],  # grid coordinates per axis
    voxel: float,
    viewmats: torch.Tensor,  # [C, 4, 4] the fitted views
    Ks: torch.Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    down: torch.Tensor,  # [3] away from the cameras (the views form a ring above the object)
    level: float,  # the lowest seen point's height along `down`
    clamp: float,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """The field with hidden undersides closed at their attachment's height (unchanged when there are none)."""
    stride = max(1, math.ceil(max(field.shape) / UNDERSIDE_GRID))
    coarse = field[::stride, ::stride, ::stride]
    coarse_voxel = voxel * stride
    inside = coarse > 0
    index, points, normals = shell_voxels(coarse, axes, coarse_voxel)  # [B, 3] each
    if len(index) == 0:
        return field
    origin = torch.tensor([float(a[0]) for a in axes])
    heights = points @ down
    half_size = 0.5 * voxel * (max(field.shape) - 1)
    band, clearance = ABOVE_LEVEL * half_size, CLEARANCE * half_size
    downward = (normals @ down > FLOOR_COS) & (heights < level - band)
    if not bool(downward.any()):
        return field
    check_cancel(cancel)
    nearest = nearest_depths(points, viewmats, Ks, width, height)
    # Seen or not: first for the downward voxels, then for the rest of the shell near large pieces.
    downward = torch.nonzero(downward).squeeze(-1)
    _, seen_down = faced_and_seen(points[downward], normals[downward], viewmats, Ks, nearest, width, height, coarse_voxel)
    grid_hidden = torch.zeros(coarse.shape, dtype=torch.bool)
    grid_hidden[tuple(index[downward[~seen_down]].T)] = True
    labels, count = scipy.ndimage.label(grid_hidden.numpy(), structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    large = np.nonzero(sizes[1:] >= MIN_PIECE * max(coarse.shape) ** 2)[0] + 1
    if len(large) == 0:
        return field
    # Each large piece's box grown by a voxel (what dilate() reaches).
    objects = scipy.ndimage.find_objects(labels)
    boxes = [tuple(slice(max(0, b.start - 1), b.stop + 1) for b in objects[label - 1]) for label in large]
    near = torch.zeros(coarse.shape, dtype=torch.bool)
    for box in boxes:
        near[box] = True
    nearby = torch.nonzero(near[tuple(index.T)]).squeeze(-1)
    _, seen_nearby = faced_and_seen(points[nearby], normals[nearby], viewmats, Ks, nearest, width, height, coarse_voxel)
    grid_seen = torch.zeros(coarse.shape, dtype=torch.bool)
    grid_seen[tuple(index[nearby[seen_nearby]].T)] = True
    position = torch.full(coarse.shape, -1, dtype=torch.long)
    position[tuple(index.T)] = torch.arange(len(index))
    opening = torch.full(coarse.shape, float("inf"))
    shape = torch.tensor(coarse.shape)
    eyes = camera_centres(viewmats)  # [C, 3]
    for label, box in zip(large, boxes):
        check_cancel(cancel)
        corner = torch.tensor([b.start for b in box])  # box indices + corner = grid indices
        piece = torch.from_numpy(labels[box] == label)
        piece_index = torch.nonzero(piece) + corner
        attached = torch.nonzero(dilate(piece) & grid_seen[box]) + corner
        if len(attached) == 0:
            continue
        at = position[tuple(attached.T)]
        attached_facing = float(_facing(points[at], normals[at], eyes).median())
        # The seen edge: attached voxels with no seen voxel just below them (a leg's side goes on
        # down past where the hidden surface meets it; a slab's side ends at its underside).
        below_it = torch.minimum(torch.round(attached.float() + down).long().clamp(min=0), shape - 1)
        edge = torch.zeros_like(piece)
        edge[tuple((attached[~grid_seen[tuple(below_it.T)]] - corner).T)] = True
        # The piece where it meets that edge: there the hull's surface is the seen side's end
        # (rays under the edge graze it), found between grid points along `down`.
        border = torch.nonzero(dilate(edge) & piece) + corner
        if len(border) == 0:
            continue
        border_heights = heights[position[tuple(border.T)]] + _surface_below(coarse, border, down, coarse_voxel)
        closure = float(border_heights.median())
        spread = float(torch.quantile(border_heights, 0.9) - torch.quantile(border_heights, 0.1))
        if attached_facing < ATTACHED_FACING or spread > LEVEL_EDGE * coarse_voxel or level - closure < clearance:
            continue
        piece_heights = heights[position[tuple(piece_index.T)]]
        below = piece_index[piece_heights > closure + 0.5 * coarse_voxel]
        if len(below) == 0:
            continue
        # Each column from the hidden surface up to the closure, where the object goes on above it.
        steps = math.ceil(float((piece_heights - closure).max()) / coarse_voxel) + 2
        ladder = torch.round(below.float()[:, None, :] + torch.arange(steps + 2).float()[None, :, None] * -down).long()  # [P, S, 3]
        within = ((ladder >= 0) & (ladder < shape)).all(-1)
        ladder = torch.minimum(ladder.clamp(min=0), shape - 1)
        rung_heights = ladder.float() @ down * coarse_voxel + float(origin @ down)
        rung_inside = inside[tuple(ladder.permute(2, 0, 1))] & within
        reached = rung_heights <= closure - coarse_voxel  # a voxel above the closure
        # Inside all the way up to a voxel above the closure (a handle's bar ends before it).
        first_reached = torch.argmax(reached.int(), dim=1)
        run = torch.cumprod(rung_inside.int(), dim=1).bool()
        whole = reached.any(1) & run[torch.arange(len(below)), first_reached]
        # From the hidden surface to two voxels above the closure, so that the plane decides the crossing.
        rungs = ladder[whole][(rung_heights[whole] > closure - 2 * coarse_voxel) & within[whole]]  # [R, 3]
        opening[tuple(rungs.T)] = torch.minimum(opening[tuple(rungs.T)], torch.full((len(rungs),), closure))
    opened = torch.nonzero(torch.isfinite(opening))
    if len(opened) == 0:
        return field
    # The cut: the plane at each column's closure height, signed (inside above it), where opened;
    # each fine grid point takes its nearest coarse point's closure. Only over the opened box (a
    # few full-grid temporaries at 384³ would be ~1 GB).
    low = (opened.min(0).values * stride - stride).clamp(min=0).tolist()
    high = [min(n, int(h) * stride + stride + 1) for n, h in zip(field.shape, opened.max(0).values)]
    nearest_coarse = [torch.clamp(torch.round(torch.arange(a, b) / stride).long(), max=m - 1) for a, b, m in zip(low, high, opening.shape)]
    levels = opening[nearest_coarse[0][:, None, None], nearest_coarse[1][None, :, None], nearest_coarse[2][None, None, :]]
    part = [axis[a:b] for axis, a, b in zip(axes, low, high)]
    height_of = part[0][:, None, None] * down[0] + part[1][None, :, None] * down[1] + part[2][None, None, :] * down[2]
    cut = torch.where(torch.isfinite(levels), (levels - height_of).clamp(-clamp, clamp), torch.full_like(height_of, float("inf")))
    out = field.clone()
    block = tuple(slice(a, b) for a, b in zip(low, high))
    out[block] = torch.minimum(field[block], cut)
    return out


def _facing(
    points: torch.Tensor,  # [P, 3]
    normals: torch.Tensor,  # [P, 3] outward
    eyes: torch.Tensor,  # [C, 3] the cameras' centres
) -> torch.Tensor:
    """[P] the largest cosine between each point's normal and the direction to a camera."""
    directions = torch.nn.functional.normalize(eyes[None] - points[:, None], dim=-1)  # [P, C, 3]
    return (directions * normals[:, None]).sum(-1).amax(1)


def _surface_below(
    field: torch.Tensor,  # [X, Y, Z] inside-positive
    index: torch.Tensor,  # [P, 3] inside grid points
    down: torch.Tensor,  # [3] unit
    voxel: float,
    reach: int = 3,  # grid steps looked down
) -> torch.Tensor:
    """[P] how far below each point (along `down`, world units) the field crosses zero, linearly
    interpolated between grid points; `reach` steps where it does not within them."""
    shape = torch.tensor(field.shape)
    distance = torch.full((len(index),), float(reach) * voxel)
    found = torch.zeros(len(index), dtype=torch.bool)
    previous = field[tuple(index.T)]
    for k in range(1, reach + 1):
        at = torch.round(index.float() + k * down).long()
        at = torch.minimum(at.clamp(min=0), shape - 1)
        value = field[tuple(at.T)]
        crossing = ~found & (value <= 0)
        fraction = previous / (previous - value).clamp_min(1e-12)
        distance = torch.where(crossing, (k - 1 + fraction) * voxel, distance)
        found |= crossing
        previous = value
    return distance
