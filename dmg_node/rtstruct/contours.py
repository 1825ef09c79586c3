"""Voxel-mask <-> closed planar polygon geometry of one slice, in (column, row) index coordinates.

:func:`slice_polygons` traces a slice mask's voxel-edge boundary exactly (pixel corners), each
region's holes joined to its outer boundary by zero-width "keyhole" cuts;
:func:`closing_edge_along` picks where a polygon starts; :func:`add_crossings` is the scanline
step of filling polygons back onto voxel centres (even-odd rule). Pure numpy: no DICOM here;
:mod:`dmg_node.rtstruct` maps the polygons to patient coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def add_crossings(counts: npt.NDArray[np.int32], poly: npt.NDArray[np.float64]) -> None:
    """Count, per row of voxel centres, the polygon edges crossed left of each voxel (scanline fill)."""
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    first, stop = np.ceil(lo).astype(np.int64), np.ceil(hi).astype(np.int64)  # rows j with lo <= j < hi
    n_rows = np.maximum(stop - first, 0)
    edge = np.repeat(np.arange(len(poly)), n_rows)
    j = np.repeat(first, n_rows) + (np.arange(edge.size) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows))
    x = x0[edge] + (j - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    keep = (j >= 0) & (j < counts.shape[0])
    column = np.clip(np.floor(x[keep]).astype(np.int64) + 1, 0, counts.shape[1] - 1)
    np.add.at(counts, (j[keep], column), 1)


def closing_edge_along(polygon: npt.NDArray[np.float64], axis: int) -> npt.NDArray[np.float64]:
    """Rotate *polygon*'s start so that its closing edge (last -> first point) runs along index *axis*.

    The caller picks the in-plane axis least parallel to patient z. plastimatch 1.9.4 drops
    the last point of a contour when it has the first point's x and y (its test for an explicitly
    closed contour ignores z), which on a sagittal or coronal slice cuts a corner off any
    contour whose closing edge runs along z: up to half of a square lost, keyholes broken.
    """
    step = polygon - np.roll(polygon, 1, axis=0)
    start = int(np.flatnonzero(step[:, axis] != 0)[0])
    return np.roll(polygon, -start, axis=0)


def slice_polygons(mask2d: npt.NDArray[np.bool_]) -> list[npt.NDArray[np.float64]]:
    """Boundary polygons of one slice along voxel edges, in (column, row) index coordinates.

    Returns one polygon per 8-connected region, its holes (4-connected background enclosed by
    it) joined in by zero-width cuts; vertices are voxel corners (half-integer indices) with
    collinear points dropped, so a single voxel gives a 4-point square.
    """
    loops = _trace_loops(mask2d)
    # Every loop becomes a ring of nodes (a point and the index of the next node), so that a
    # hole is spliced in with a few pointer changes: slices with thousands of holes stay linear.
    points: list[tuple[int, int]] = []
    nxt: list[int] = []
    nodes_at: dict[tuple[int, int], list[int]] = {}
    outer_starts, holes = [], []
    for loop in loops:
        first = len(points)
        for n, point in enumerate(loop):
            nodes_at.setdefault(point, []).append(first + n)
        points += loop
        nxt += [*range(first + 1, first + len(loop)), first]
        if _area2(loop) > 0:
            outer_starts.append(first)
        else:
            top = min(range(len(loop)), key=lambda n: (loop[n][1], loop[n][0]))
            holes.append((loop[top][::-1], first, len(loop), top))
    # Topmost hole first: the cut from a hole's top-left corner ends on a loop above it.
    for (top_y, top_x), first, size, top in sorted(holes):
        # Walk up the pixel edge x = top_x (between columns top_x - 1 and top_x) through the
        # region to the first boundary above the hole; that point lies on exactly one other
        # loop (y == top_y: the hole touches it at this corner and the cut has no length).
        y = top_y
        while y > 0 and mask2d[y - 1, top_x - 1] and mask2d[y - 1, top_x]:
            y -= 1
        at = next(n for n in nodes_at[(top_x, y)] if not first <= n < first + size)
        corner, before_corner = first + top, first + (top - 1) % size
        down = [(top_x, yy) for yy in range(y + 1, top_y)]
        up = [(top_x, yy) for yy in range(top_y, y - 1, -1)]
        after = nxt[at]
        nxt[at] = _append_chain(points, nxt, down, corner)
        nxt[before_corner] = _append_chain(points, nxt, up, after)
    polygons = []
    for start in outer_starts:
        ring, node = [points[start]], nxt[start]
        while node != start:
            ring.append(points[node])
            node = nxt[node]
        polygons.append(np.asarray(_corners(ring), dtype=np.float64) - 0.5)
    return polygons


def _append_chain(points: list[tuple[int, int]], nxt: list[int], chain: list[tuple[int, int]], then: int) -> int:
    """Add nodes for *chain* linked in order and on to node *then*; return the first (or *then*)."""
    if not chain:
        return then
    first = len(points)
    points += chain
    nxt += [*range(first + 1, first + len(chain)), then]
    return first


# Unit steps on the pixel-corner lattice (x right, y down) and the left turn of each.
_STEPS = ((1, 0), (0, 1), (-1, 0), (0, -1))
_LEFT = {0: 3, 1: 0, 2: 1, 3: 2}


def _trace_loops(mask2d: npt.NDArray[np.bool_]) -> list[list[tuple[int, int]]]:
    """Closed loops of voxel edges between mask and background, as lists of pixel corners.

    Corner (x, y) is the top-left corner of pixel (column x, row y). Each edge keeps the mask on
    its right, so outer boundaries run clockwise on screen (positive :func:`_area2`) and holes
    anticlockwise. Where two mask pixels touch only at a corner the loop turns left, which keeps
    them in one loop (8-connected regions, 4-connected holes, as OpenCV's findContours).
    """
    m = np.pad(mask2d, 1)
    fg = m[1:-1, 1:-1]
    out: dict[tuple[int, int], list[int]] = {}
    # (neighbour that must be background, start corner offset, step index) for each side.
    for bg, (dx, dy), step in ((m[:-2, 1:-1], (0, 0), 0), (m[1:-1, 2:], (1, 0), 1),
                               (m[2:, 1:-1], (1, 1), 2), (m[1:-1, :-2], (0, 1), 3)):
        for r, c in zip(*np.nonzero(fg & ~bg), strict=True):
            out.setdefault((int(c) + dx, int(r) + dy), []).append(step)
    seen: set[tuple[tuple[int, int], int]] = set()
    loops = []
    for start, steps in out.items():
        for step in steps:
            edge = (start, step)
            loop = []
            while edge not in seen:
                seen.add(edge)
                (x, y), s = edge
                loop.append((x, y))
                nxt = (x + _STEPS[s][0], y + _STEPS[s][1])
                choices = out[nxt]
                edge = (nxt, choices[0] if len(choices) == 1 else _LEFT[s])
            if loop:
                loops.append(loop)
    return loops


def _area2(loop: Sequence[tuple[int, int]]) -> int:
    """Twice the signed area of a closed loop (shoelace); positive for outer boundaries."""
    x = np.asarray([p[0] for p in loop])
    y = np.asarray([p[1] for p in loop])
    return int(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _corners(ring: Sequence[tuple[int, int]]) -> npt.NDArray[np.int64]:
    """The points of a closed lattice path where its direction changes (repeats and straight runs dropped)."""
    pts = np.asarray(ring, dtype=np.int64)
    pts = pts[np.any(pts != np.roll(pts, 1, axis=0), axis=1)]
    before = np.sign(pts - np.roll(pts, 1, axis=0))
    after = np.sign(np.roll(pts, -1, axis=0) - pts)
    corners: npt.NDArray[np.int64] = pts[np.any(before != after, axis=1)]
    return corners
