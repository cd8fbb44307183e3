"""Cone-beam projection of the prepared CT (and its structure groups) into a PA radiograph.

Geometry (world = the CT's RAS frame, mm; +x patient right, +y anterior, +z superior):
    * PA view: the X-ray source is behind the patient and the detector in front of the chest, so
      rays travel along +y. The detector image is seen from the source side flipped to the
      radiological display convention: column index increases towards the patient's LEFT
      (-x), row index increases towards the FEET (-z). The patient's right is therefore on the
      image's left, as on every PA chest film.
    * The source-to-image distance ``sid`` and the object(centre)-to-image distance ``oid`` set the
      magnification ``sid / (sid - oid)`` at the patient's centre.
    * The patient pose is applied by mapping every sample point p of the posed patient back into
      the CT: ``q = R^T (p - c) / s + c + shift``, where ``R`` composes rotation about the vertical
      axis (body rotation), about the left-right axis (tilt: lordotic/kyphotic) and about the beam
      axis (in-plane roll), ``c`` is the chest centre and ``s`` a global size factor.
    * Organ scaling and other 3D deformations are applied to the volumes before projection
      (:func:`anatomy_vlm.demo.findings.enlarge_heart`); smooth 2D deformation after it (builder).

Physics: linear attenuation from HU, ``mu = mu_water * (1 + HU/1000)`` with a small extra weight on
bone (HU > 200, photoelectric effect at radiographic energies); line integrals by trilinear sampling
along each ray (``torch.nn.functional.grid_sample``) times the step length. The detector signal
follows Beer-Lambert, ``I = I0 exp(-integral)``; :mod:`anatomy_vlm.demo.render` turns it into grey
levels. Structure groups are projected with nearest sampling on the same rays; a pixel belongs to a
group when any sample on its ray does (an X-ray sees every structure it passes through, so groups
overlap in the projection, e.g. lung behind the heart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .ct import GROUP_NAMES, PreparedCT

MU_WATER = 0.0206  # 1/mm, about 60 keV effective energy


@dataclass(frozen=True)
class Geometry:
    """Everything that fixes one projection.

    Attributes:
        rows, cols: Detector size in pixels (output image shape is ``(rows, cols)``).
        pixel_mm: Detector pixel size in mm (square pixels), at the detector plane.
        sid: Source-to-image distance, mm.
        oid: Distance from the chest centre to the detector plane, mm.
        centre: Chest centre (world mm): the pose's rotation centre and the point the central ray
            passes through before the shift.
        rotation_deg: Body rotation about the vertical axis (positive: patient's left towards the
            detector), degrees.
        tilt_deg: Rotation about the left-right axis (lordotic when positive), degrees.
        roll_deg: In-plane rotation about the beam axis, degrees.
        scale: Global size factor of the patient.
        shift_mm: Detector offset (x, z) of the central ray relative to ``centre``, mm at the detector.
        samples: Ray samples through the body (depth resolution).
    """

    rows: int
    cols: int
    pixel_mm: float
    sid: float = 1800.0
    oid: float = 150.0
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation_deg: float = 0.0
    tilt_deg: float = 0.0
    roll_deg: float = 0.0
    scale: float = 1.0
    shift_mm: tuple[float, float] = (0.0, 0.0)
    samples: int = 128

    @property
    def magnification(self) -> float:
        return self.sid / (self.sid - self.oid)


def _rotation(g: Geometry) -> np.ndarray:
    a, t, r = (math.radians(v) for v in (g.rotation_deg, g.tilt_deg, g.roll_deg))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    ry = np.array([[math.cos(r), 0, math.sin(r)], [0, 1, 0], [-math.sin(r), 0, math.cos(r)]])
    return ry @ rx @ rz


class Projector:
    """Projects one prepared CT under many geometries. Holds the volumes as torch tensors.

    Args:
        ct: The prepared CT. Studies with inserted findings pass their own volumes to
            :meth:`project` / :meth:`project_groups`.
    """

    def __init__(self, ct: PreparedCT):
        self.ct = ct
        self.inv_affine = np.linalg.inv(ct.affine)
        self.shape = np.array(ct.hu.shape)
        # world y extent of the body: rays are sampled only there
        ys = ct.affine[1, 1] * np.array([0, ct.hu.shape[1] - 1]) + ct.affine[1, 3]
        self.y_range = (float(ys.min()), float(ys.max()))
        self.groups_t = self.to_volume(ct.groups.astype(np.float32))

    @staticmethod
    def to_volume(a: np.ndarray) -> torch.Tensor:
        """(I, J, K) numpy volume -> contiguous (1, 1, K, I, J) tensor, the layout the projector samples."""
        return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (2, 0, 1))))[None, None]

    @staticmethod
    def attenuation(hu) -> torch.Tensor:
        """Linear attenuation (1/mm) from HU, with extra weight on bone (see module docstring)."""
        h = torch.from_numpy(np.asarray(hu, dtype=np.float32))
        mu = MU_WATER * torch.clamp(1.0 + h / 1000.0, min=0.0)
        mu = mu + MU_WATER * 0.35 * torch.clamp((h - 200.0) / 1000.0, min=0.0)
        return mu

    def attenuation_volume(self, hu: np.ndarray) -> torch.Tensor:
        """Attenuation of an (I, J, K) HU volume in the projector's (1, 1, K, I, J) layout."""
        return self.to_volume(self.attenuation(hu).numpy())

    def _sample_points(self, g: Geometry, r0: int, r1: int, rows_step: int = 1, cols_step: int = 1):
        """Normalised grid coordinates (for grid_sample) and the step length per ray, rows r0..r1.

        The map from a detector pixel and a depth plane to CT coordinates is affine in the posed
        point, so the grid is built from broadcast sums of small tensors (float32) rather than a
        per-sample matrix product.
        """
        rot = _rotation(g)
        c = np.asarray(g.centre, dtype=np.float64)
        y_det = c[1] + g.oid
        src = np.array([c[0], y_det - g.sid, c[2]])
        rr = np.arange(r0, r1, rows_step, dtype=np.float64)
        cc = np.arange(0, g.cols, cols_step, dtype=np.float64)
        dx = c[0] + g.shift_mm[0] - (cc + 0.5 - g.cols / 2) * g.pixel_mm  # col -> -x
        dz = c[2] + g.shift_mm[1] - (rr + 0.5 - g.rows / 2) * g.pixel_mm  # row -> -z
        half = 0.5 * (self.y_range[1] - self.y_range[0]) * 1.15
        ys = np.linspace(c[1] - half, c[1] + half, g.samples)
        frac = (ys - src[1]) / (y_det - src[1])
        # posed point p = (src_x + f (dx - src_x), y, src_z + f (dz - src_z)); CT point
        # q = R^T (p - c) / s + c; voxel index = A q + a; normalised n = 2 idx / (size - 1) - 1.
        A = self.inv_affine
        size = self.shape.astype(np.float64)
        N = np.diag(2.0 / (size - 1))
        M = N @ A[:3, :3] @ rot.T / g.scale          # n = M p + t
        t = N @ (A[:3, :3] @ (c - rot.T @ c / g.scale) + A[:3, 3]) - 1.0
        # Volumes are held as (1, 1, K, I, J) (z, x, y): the rays run along j (anterior), which is
        # then the fastest-varying memory axis; measured about 2.3x faster than (I, J, K).
        # grid_sample's grid order is (W, H, D) = (j, i, k).
        M = M[[1, 0, 2]].copy()
        t = t[[1, 0, 2]].copy()
        f = torch.from_numpy(frac).float()
        colterm = torch.from_numpy(np.outer(dx - src[0], M[:, 0])).float()   # (C, 3)
        rowterm = torch.from_numpy(np.outer(dz - src[2], M[:, 2])).float()   # (R, 3)
        depth = torch.from_numpy(np.outer(ys, M[:, 1]) + src[0] * M[:, 0] + src[2] * M[:, 2] + t).float()
        lateral = colterm[None, :, None, :] + rowterm[:, None, None, :]  # (R, C, 1, 3)
        grid = torch.mul(lateral, f[None, None, :, None])  # (R, C, D, 3)
        grid.add_(depth[None, None, :, :])
        dy = float(ys[1] - ys[0])
        ray = np.sqrt((dx[None, :] - src[0]) ** 2 + (y_det - src[1]) ** 2 + (dz[:, None] - src[2]) ** 2)
        step = torch.from_numpy(dy * ray / (y_det - src[1])).float()
        return grid, step

    def project(self, g: Geometry, mu: torch.Tensor, chunk_rows: int = 32) -> np.ndarray:
        """Line integrals of attenuation, float32 (rows, cols)."""
        out = np.zeros((g.rows, g.cols), np.float32)
        for r0 in range(0, g.rows, chunk_rows):
            r1 = min(g.rows, r0 + chunk_rows)
            grid, step = self._sample_points(g, r0, r1)
            v = F.grid_sample(mu, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)
            out[r0:r1] = (v[0, 0].sum(-1) * step).numpy()
        return out

    def project_groups(self, g: Geometry, chunk_rows: int = 32, stride: int = 1,
                       groups: torch.Tensor | None = None, n_ids: int | None = None) -> np.ndarray:
        """Which structure groups each ray passes through.

        Args:
            groups: Optional label volume (projector layout) replacing the CT's groups, e.g. with
                inserted lesions labelled by ids above the structure groups.
            n_ids: Number of label ids to report (default: the structure groups).

        Returns:
            bool array (n_ids, rows, cols): channel ``l - 1`` is label id ``l`` (so the first
            G = len(GROUP_NAMES) channels are the structure groups in the order of ``GROUP_NAMES``).
            With ``stride`` > 1 the groups are computed on a coarser detector grid and repeated
            (nearest) to full size.
        """
        G = n_ids if n_ids is not None else len(GROUP_NAMES)
        vol = self.groups_t if groups is None else groups
        R = math.ceil(g.rows / stride)
        C = math.ceil(g.cols / stride)
        out = torch.zeros(R * C, G + 1, dtype=torch.bool)
        rows_per_chunk = max(1, chunk_rows // stride) * stride
        pos = 0
        for r0 in range(0, g.rows, rows_per_chunk):
            r1 = min(g.rows, r0 + rows_per_chunk)
            grid, _ = self._sample_points(g, r0, r1, stride, stride)
            v = F.grid_sample(vol, grid[None], mode="nearest", padding_mode="zeros",
                              align_corners=True)[0, 0]
            lab = v.round().to(torch.int64).clamp_(0, G).reshape(-1, v.shape[-1])
            n = lab.shape[0]
            out[pos:pos + n].scatter_(1, lab, True)
            pos += n
        m = out[:, 1:].T.reshape(G, R, C).numpy()
        if stride > 1:
            m = m.repeat(stride, 1).repeat(stride, 2)[:, : g.rows, : g.cols]
        return m
