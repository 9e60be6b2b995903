"""The two Deep Potential descriptors, their per-slot Jacobian blocks and vector-Jacobian products.

Both descriptors are built on the neighbour slots of :mod:`app.physics.environment` and produce an
*environment array* ``env`` of shape (n, nslot, 4): four numbers per neighbour slot, zero for empty slots.

``loc_frame`` (DeePMD, Zhang et al., PRL 120, 143001, 2018)
    For atom i a local frame (e_x, e_y, e_z) is built from two axis neighbours a and b::

        e_x = a / |a|,   u = b - (b . e_x) e_x,   e_y = u / |u|,   e_z = e_x x e_y

    A neighbour at rij (distance r, local coordinates q = (e_x . rij, e_y . rij, e_z . rij)) in one of the
    first ``sel_a[t]`` slots of its element gives (1/r, q_x/r^2, q_y/r^2, q_z/r^2); in one of the next
    ``sel_r[t]`` slots it gives 1/r only (the other three columns stay zero). The network's input is the
    flat feature vector of :meth:`LocFrame.features`.

    Axis rule, per centre element: ``[[elem_a, rank_a], [elem_b, rank_b]]`` (for water: O uses its two
    nearest H, H its nearest O and nearest H). Awkward cases, each defined and NaN-free:

    * the rule's atom is missing (too few neighbours of that element): the nearest neighbour of any element
      not used yet takes its place;
    * the second axis atom is collinear with the first (|e_x x b| < 1e-6 |b|): the next-ranked neighbour of
      the same element, then the nearest of any element, is taken instead;
    * only one usable neighbour: e_y is built from the coordinate axis least aligned with e_x, a constant;
      every neighbour then lies on e_x so the frame's arbitrary rotation about e_x does not change ``env``;
    * no neighbour: ``env`` is zero and so is the force.

    Known weakness stated by its authors: the energy is discontinuous at the cutoff and when neighbours
    change rank or axis atoms swap.

``se_e2_a`` (DeepPot-SE, Zhang et al., NeurIPS 2018)
    Row of a neighbour: s(r) (1, x/r, y/r, z/r) with the switching function::

        s(r) = 1/r                                   r < rcut_smth
        s(r) = (1/r) [u^3 (-6u^2 + 15u - 10) + 1]    rcut_smth <= r < rcut,  u = (r - rcut_smth)/(rcut - rcut_smth)
        s(r) = 0                                     r >= rcut

    s and s' are continuous at rcut_smth and vanish at rcut (smooth to second order in u).

Derivatives. ``jacobian`` returns blocks J (n, nslot, 4, 3) = d env[i, k, :] / d rij_k (and for loc_frame
also the blocks Ja, Jb with respect to the two axis vectors). The vector-Jacobian product turns
g = dE/d env into dE/drij per slot without ever forming a dense Jacobian::

    dE/drij_k = sum_c g[k, c] J[k, c, :]  (+ for loc_frame, on the axis slots, sum_k,c g[k, c] Ja[k, c, :])

``vjp`` evaluates exactly this sum in factored form from the quantities ``compute`` keeps (it never
builds the blocks, which are most of the memory traffic); the blocks are built on first access to
``chunk.jac`` / ``jac_a`` / ``jac_b`` (training uses them as a fixed tensor per frame). Tests check that
both give the same dE/drij.

All arrays are float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .environment import Slots, build_slots
from .neighbors import NeighborList

__all__ = ["LocFrame", "SeA", "DescriptorChunk", "make_descriptor", "vjp_from_blocks"]

_COLLINEAR_TOL = 1e-6


@dataclass
class DescriptorChunk:
    """Everything computed for a block of centre atoms [start, stop) of one frame.

    env (n, nslot, 4); for loc_frame also axis (n, 2), the slot indices of the two axis atoms (-1: none).
    extras: the intermediate quantities the derivative is built from (per descriptor).
    jac (n, nslot, 4, 3) and, for loc_frame, jac_a, jac_b (n, nslot, 4, 3) with respect to the two axis
    vectors: Jacobian blocks, built by ``descriptor.jacobian`` on first access and then kept.
    """

    start: int
    stop: int
    slots: Slots
    env: np.ndarray
    axis: np.ndarray | None = None
    extras: dict = field(default_factory=dict)
    descriptor: object = field(default=None, repr=False)
    _blocks: tuple | None = field(default=None, repr=False)

    def _get_blocks(self):
        if self._blocks is None:
            self._blocks = self.descriptor.jacobian(self)
        return self._blocks

    @property
    def jac(self) -> np.ndarray:
        return self._get_blocks()[0]

    @property
    def jac_a(self) -> np.ndarray | None:
        return self._get_blocks()[1]

    @property
    def jac_b(self) -> np.ndarray | None:
        return self._get_blocks()[2]


def vjp_from_blocks(chunk: DescriptorChunk, g_env: np.ndarray) -> np.ndarray:
    """dE/drij (n, nslot, 3) by contracting g_env with the Jacobian blocks (the reference for ``vjp``)."""
    out = np.einsum("nkc,nkcx->nkx", g_env, chunk.jac)
    if chunk.jac_a is not None:
        rows = np.arange(out.shape[0])
        for blocks, a in ((chunk.jac_a, chunk.axis[:, 0]), (chunk.jac_b, chunk.axis[:, 1])):
            ga = np.einsum("nkc,nkcx->nx", g_env, blocks)
            ok = a >= 0
            out[rows[ok], a[ok]] += ga[ok]
    return out


def _cross_matrix(v):
    """[v]_x with [v]_x w = v x w; v (..., 3) -> (..., 3, 3)."""
    z = np.zeros(v.shape[:-1])
    x, y, w = v[..., 0], v[..., 1], v[..., 2]
    return np.stack([np.stack([z, -w, y], -1), np.stack([w, z, -x], -1), np.stack([-y, x, z], -1)], -2)


class _Base:
    kind: str
    rcut: float
    ntypes: int

    @property
    def sel(self) -> np.ndarray:
        raise NotImplementedError

    def chunks(self, nl: NeighborList, types, chunk_size: int | None = None):
        """Yield :class:`DescriptorChunk` for blocks of at most ``chunk_size`` centre atoms."""
        n = len(types)
        step = n if not chunk_size else int(chunk_size)
        for s in range(0, n, max(step, 1)):
            yield self.compute(nl, types, slice(s, min(n, s + step)))

    def compute(self, nl: NeighborList, types, centers: slice | None = None) -> DescriptorChunk:
        raise NotImplementedError

    def vjp(self, chunk: DescriptorChunk, g_env: np.ndarray) -> np.ndarray:
        """dE/drij per slot (n, nslot, 3) from g_env = dE/d env (n, nslot, 4); zero in empty slots."""
        raise NotImplementedError

    def jacobian(self, chunk: DescriptorChunk) -> tuple:
        """Jacobian blocks (jac, jac_a, jac_b) of a chunk (see :class:`DescriptorChunk`)."""
        raise NotImplementedError


@dataclass
class SeA(_Base):
    """se_e2_a environment (see module docstring). ``sel`` per neighbour element."""

    rcut: float
    rcut_smth: float
    sel_: list[int]
    kind: str = "se_e2_a"

    def __post_init__(self):
        if not (0 <= self.rcut_smth < self.rcut):
            raise ValueError(f"need 0 <= rcut_smth < rcut, got rcut_smth={self.rcut_smth}, rcut={self.rcut}")
        self.ntypes = len(self.sel_)

    @property
    def sel(self) -> np.ndarray:
        return np.asarray(self.sel_, dtype=np.int64)

    @property
    def nslot(self) -> int:
        return int(self.sel.sum())

    def switch(self, r):
        """s(r) and ds/dr for r > 0 (array)."""
        rs, rc = self.rcut_smth, self.rcut
        u = r - rs
        u *= 1.0 / (rc - rs)
        np.clip(u, 0.0, 1.0, out=u)
        # u^3 (-6u^2 + 15u - 10) + 1 factored as (1 - u)^3 (1 + 3u + 6u^2): the same polynomial without
        # the cancellation near u = 1, so s >= 0 and s ~ (rcut - r)^3 right up to the cutoff
        om = 1.0 - u
        om2 = om * om
        sw = 6.0 * u
        sw += 3.0
        sw *= u
        sw += 1.0
        sw *= om2
        sw *= om  # (1 - u)^3 (1 + 3u + 6u^2)
        dsw = u * u
        dsw *= om2
        dsw *= -30.0 / (rc - rs)  # d sw / dr = -30 u^2 (1 - u)^2 / (rc - rs)
        inv = 1.0 / r
        s = sw * inv
        ds = dsw * inv
        ds -= s * inv  # (sw/r)' = sw'/r - sw/r^2
        return s, ds

    def compute(self, nl, types, centers=None) -> DescriptorChunk:
        types = np.asarray(types)
        c = centers or slice(0, len(types))
        slots = build_slots(nl, types, self.sel, c)
        n, nslot = slots.pair.shape
        m = slots.mask
        r = np.where(m, slots.r, 1.0)  # (n, nslot) dummy 1 in empty slots, masked below
        s, ds = self.switch(r)
        s *= m
        ds *= m
        inv_r = 1.0 / r
        t = s * inv_r  # s/r
        dt = (ds - t) * inv_r  # d(s/r)/dr = s'/r - s/r^2
        env = np.empty((n, nslot, 4))
        env[..., 0] = s
        np.multiply(t[..., None], slots.rij, out=env[..., 1:])
        # d env / d rij = rij (x) (a, b rij) + t [0; I]: a = s'/r, b = (s/r)'/r (zero in empty slots)
        extras = dict(a=ds * inv_r, b=dt * inv_r, t=t)
        return DescriptorChunk(c.start, c.stop, slots, env, extras=extras, descriptor=self)

    def jacobian(self, chunk: DescriptorChunk) -> tuple:
        """d env[k, c] / d rij_k[x]: row 0 is s' rhat = a rij; rows 1..3 are (s/r)' rhat_x x_c + (s/r) delta_cx."""
        a, b, t = chunk.extras["a"], chunk.extras["b"], chunk.extras["t"]
        rij = chunk.slots.rij
        n, nslot = a.shape
        jac = np.empty((n, nslot, 4, 3))
        np.multiply(a[..., None], rij, out=jac[:, :, 0, :])
        np.multiply(rij[..., :, None], rij[..., None, :], out=jac[:, :, 1:, :])
        jac[:, :, 1:, :] *= b[..., None, None]
        for x in range(3):
            jac[:, :, 1 + x, x] += t
        return jac, None, None

    def vjp(self, chunk: DescriptorChunk, g_env: np.ndarray) -> np.ndarray:
        """dE/drij = rij (g_0 a + b g_xyz . rij) + t g_xyz (the blocks of :meth:`jacobian`, contracted)."""
        a, b, t = chunk.extras["a"], chunk.extras["b"], chunk.extras["t"]
        rij = chunk.slots.rij
        gx = g_env[..., 1:]
        coef = g_env[..., 0] * a + b * np.einsum("nkx,nkx->nk", gx, rij)  # (n, nslot)
        out = rij * coef[..., None]
        out += gx * t[..., None]
        return out


@dataclass
class LocFrame(_Base):
    """loc_frame descriptor (see module docstring).

    sel_a_, sel_r_: per neighbour element. axis_rule: per centre element ``[[t_a, rank_a], [t_b, rank_b]]``
    with element indices.
    """

    rcut: float
    sel_a_: list[int]
    sel_r_: list[int]
    axis_rule: list[list[list[int]]]
    kind: str = "loc_frame"

    def __post_init__(self):
        if len(self.sel_a_) != len(self.sel_r_):
            raise ValueError("sel_a and sel_r must have one entry per element")
        self.ntypes = len(self.sel_a_)
        if len(self.axis_rule) != self.ntypes:
            raise ValueError(f"axis_rule needs one entry per element ({self.ntypes}), got {len(self.axis_rule)}")
        sa, sr = np.asarray(self.sel_a_), np.asarray(self.sel_r_)
        # slot k is an "a" slot (4 numbers) or an "r" slot (1/r only)
        off = np.concatenate([[0], np.cumsum(sa + sr)[:-1]])
        self.is_a = np.concatenate([np.arange(sa[t] + sr[t]) < sa[t] for t in range(self.ntypes)])
        self.type_offset = off
        self._a_idx = np.flatnonzero(self.is_a)
        self._r_idx = np.flatnonzero(~self.is_a)

    @property
    def sel(self) -> np.ndarray:
        return np.asarray(self.sel_a_, dtype=np.int64) + np.asarray(self.sel_r_, dtype=np.int64)

    @property
    def nslot(self) -> int:
        return int(self.sel.sum())

    @property
    def dim(self) -> int:
        return 4 * len(self._a_idx) + len(self._r_idx)

    def features(self, env: np.ndarray) -> np.ndarray:
        """Flat descriptor D (n, dim): all four numbers of the a-slots, then 1/r of the r-slots."""
        n = env.shape[0]
        return np.concatenate([env[:, self._a_idx, :].reshape(n, -1), env[:, self._r_idx, 0]], axis=1)

    def features_grad_to_env(self, g: np.ndarray) -> np.ndarray:
        """Inverse scatter of :meth:`features`: dE/dD (n, dim) -> dE/d env (n, nslot, 4)."""
        n = g.shape[0]
        na = len(self._a_idx)
        out = np.zeros((n, self.nslot, 4), dtype=g.dtype)
        out[:, self._a_idx, :] = g[:, : 4 * na].reshape(n, na, 4)
        out[:, self._r_idx, 0] = g[:, 4 * na :]
        return out

    # -- axis selection ---------------------------------------------------------------------------------
    def _choose_axes(self, slots: Slots, ctypes: np.ndarray) -> np.ndarray:
        """Slot indices (n, 2) of the two axis atoms, -1 where none (see module docstring).

        Almost every atom takes the rule's two atoms; only the rows where one is missing or the two are
        collinear go through the general search (:meth:`_choose_axes_general`), which gives the same answer
        for the others too.
        """
        n = slots.pair.shape[0]
        rows = np.arange(n)
        sel = self.sel
        rule = np.asarray(self.axis_rule, dtype=np.int64)[ctypes]  # (n, 2, 2)
        slot = self.type_offset[rule[:, :, 0]] + rule[:, :, 1]  # (n, 2)
        ok = rule[:, :, 1] < sel[rule[:, :, 0]]
        slot = np.where(ok, slot, 0)
        ok &= slots.mask[rows[:, None], slot]
        ok[:, 1] &= slot[:, 1] != slot[:, 0]
        a, b = slots.rij[rows, slot[:, 0]], slots.rij[rows, slot[:, 1]]
        cr = np.linalg.norm(np.cross(a, b), axis=-1)
        ok[:, 1] &= cr > _COLLINEAR_TOL * np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)
        bad = ~ok.all(axis=1)
        if bad.any():
            slot[bad] = self._choose_axes_general(slots.mask[bad], slots.r[bad], slots.rij[bad], ctypes[bad])
        return slot

    def _choose_axes_general(self, mask, r, rij, ctypes) -> np.ndarray:
        """The axis rule with every fallback, for the rows given (mask, r (n, nslot), rij (n, nslot, 3))."""
        n, nslot = mask.shape
        sel = self.sel
        rule = np.asarray(self.axis_rule, dtype=np.int64)  # (ntypes, 2, 2)
        big = np.where(mask, r, np.inf)
        by_dist = np.argsort(big, axis=1, kind="stable")  # (n, nslot) slots nearest first
        rows = np.arange(n)

        def rule_candidates(which):
            t = rule[ctypes, which, 0]
            rank = rule[ctypes, which, 1]
            width = int(sel.max())
            ranks = rank[:, None] + np.arange(width)[None, :]  # this rank and the following ones
            cand = self.type_offset[t][:, None] + ranks
            ok = ranks < sel[t][:, None]
            return np.where(ok, cand, -1)

        def first_valid(cand, valid):
            idx = np.argmax(valid, axis=1)
            got = valid[rows, idx]
            return np.where(got, cand[rows, idx], -1)

        # axis 1: the rule's atom, else the nearest neighbour
        c1 = np.concatenate([rule_candidates(0)[:, :1], by_dist], axis=1)
        v1 = (c1 >= 0) & mask[rows[:, None], np.maximum(c1, 0)]
        a1 = first_valid(c1, v1)
        # axis 2: the rule's atom, next ranks of that element, then any neighbour by distance
        c2 = np.concatenate([rule_candidates(1), by_dist], axis=1)
        cc = np.maximum(c2, 0)
        v2 = (c2 >= 0) & mask[rows[:, None], cc] & (c2 != a1[:, None])
        a_vec = rij[rows, np.maximum(a1, 0)]  # (n, 3)
        b_vec = rij[rows[:, None], cc]  # (n, K, 3)
        cr = np.linalg.norm(np.cross(a_vec[:, None, :], b_vec), axis=-1)
        nb = np.linalg.norm(b_vec, axis=-1) * np.linalg.norm(a_vec, axis=-1)[:, None]
        v2 &= cr > _COLLINEAR_TOL * np.maximum(nb, 1e-300)
        a2 = np.where(a1 >= 0, first_valid(c2, v2), -1)
        return np.stack([a1, a2], axis=1)

    def compute(self, nl, types, centers=None) -> DescriptorChunk:
        types = np.asarray(types)
        c = centers or slice(0, len(types))
        slots = build_slots(nl, types, self.sel, c)
        n, nslot = slots.pair.shape
        rows = np.arange(n)
        axis = self._choose_axes(slots, types[c])
        has1, has2 = axis[:, 0] >= 0, axis[:, 1] >= 0

        a = np.where(has1[:, None], slots.rij[rows, np.maximum(axis[:, 0], 0)], np.array([1.0, 0, 0]))
        la = np.linalg.norm(a, axis=1)
        ex = a / la[:, None]
        # fallback b for a one-neighbour frame: the coordinate axis least aligned with e_x (a constant)
        fallback = np.eye(3)[np.argmin(np.abs(ex), axis=1)]
        b = np.where(has2[:, None], slots.rij[rows, np.maximum(axis[:, 1], 0)], fallback)
        bex = np.einsum("nx,nx->n", b, ex)
        u = b - bex[:, None] * ex
        lu = np.linalg.norm(u, axis=1)
        ey = u / lu[:, None]
        ez = np.cross(ex, ey)
        Q = np.stack([ex, ey, ez], axis=1)  # (n, 3, 3) rows are the frame vectors

        # d e_m / d a and d e_m / d b: (n, 3 [m], 3 [component], 3 [wrt])
        eye = np.eye(3)
        dex_da = (eye - ex[:, :, None] * ex[:, None, :]) / la[:, None, None]
        Py = (eye - ey[:, :, None] * ey[:, None, :]) / lu[:, None, None]  # de_y/du
        du_dex = -(ex[:, :, None] * b[:, None, :]) - bex[:, None, None] * eye
        du_db = eye - ex[:, :, None] * ex[:, None, :]
        dey_da = Py @ du_dex @ dex_da
        dey_db = Py @ du_db
        Cx, Cy = _cross_matrix(ex), _cross_matrix(ey)
        dez_da = -Cy @ dex_da + Cx @ dey_da
        dez_db = Cx @ dey_db
        # zero where there is no such axis atom (the frame then does not move with any neighbour)
        dQ_da = np.stack([dex_da, dey_da, dez_da], axis=1) * has1[:, None, None, None]
        dQ_db = np.stack([np.zeros_like(dex_da), dey_db, dez_db], axis=1) * has2[:, None, None, None]

        m = slots.mask
        r = np.where(m, slots.r, 1.0)
        rij = slots.rij
        inv_r = m / r
        inv_r2 = inv_r / r
        q = np.matmul(rij, Q.transpose(0, 2, 1))  # local coordinates (n, nslot, 3)
        w = inv_r2 * (self.is_a[None, :] & m)  # (n, nslot) 1/r^2 on the filled a-slots, else 0
        env = np.empty((n, nslot, 4))
        env[..., 0] = inv_r
        np.multiply(q, w[..., None], out=env[..., 1:])
        extras = dict(inv_r=inv_r, inv_r2=inv_r2, w=w, q=q, Q=Q, dQ_da=dQ_da, dQ_db=dQ_db)
        return DescriptorChunk(c.start, c.stop, slots, env, axis, extras, self)

    def jacobian(self, chunk: DescriptorChunk) -> tuple:
        """Blocks with respect to rij of the slot itself, and to the two axis vectors a and b::

        d(1/r)/drij = -rij / r^3
        d(q_m / r^2)/drij = e_m / r^2 - 2 q_m rij / r^4            (a-slots; q_m = e_m . rij)
        d(q_m / r^2)/da = (rij / r^2) . d e_m / da                 (and the same for b)
        """
        x = chunk.extras
        rij, w, inv_r, inv_r2, q, Q = chunk.slots.rij, x["w"], x["inv_r"], x["inv_r2"], x["q"], x["Q"]
        n, nslot = w.shape
        jac = np.zeros((n, nslot, 4, 3))
        jac[:, :, 0, :] = -rij * (inv_r2 * inv_r)[..., None]
        jac[:, :, 1:, :] = w[..., None, None] * (
            Q[:, None, :, :] - 2 * q[..., :, None] * (rij * inv_r2[..., None])[..., None, :]
        )
        v = rij * w[..., None]  # (n, nslot, 3)
        blocks = []
        for dQ in (x["dQ_da"], x["dQ_db"]):
            jb = np.zeros((n, nslot, 4, 3))
            jb[:, :, 1:, :] = np.matmul(v, dQ.transpose(0, 2, 1, 3).reshape(n, 3, 9)).reshape(n, nslot, 3, 3)
            blocks.append(jb)
        return jac, blocks[0], blocks[1]

    def vjp(self, chunk: DescriptorChunk, g_env: np.ndarray) -> np.ndarray:
        """The blocks of :meth:`jacobian` contracted with g, in factored form (gq_m = g_m / r^2 on a-slots)::

        dE/drij = sum_m gq_m e_m - rij (g_0 / r^3 + 2 / r^2 sum_m gq_m q_m)
        dE/da = sum_m,x M_mx d e_mx / da,   M = sum_k gq_k (x) rij_k   (added to the axis atom's slot)
        """
        x = chunk.extras
        rij, Q = chunk.slots.rij, x["Q"]
        gq = g_env[..., 1:] * x["w"][..., None]  # (n, nslot, 3)
        # sum_m gq_m q_m = sum_m g_m env_m (env_m = q_m / r^2 on a-slots), so with env_0 = 1/r:
        # g_0 / r^3 + 2 / r^2 sum_m gq_m q_m = (2 g . env - g_0 / r) / r^2
        g0_inv_r = g_env[..., 0] * x["inv_r"]
        coef = np.einsum("nkc,nkc->nk", g_env, chunk.env)
        coef *= 2.0
        coef -= g0_inv_r
        coef *= x["inv_r2"]
        out = np.matmul(gq, Q)  # (n, nslot, 3)
        out -= rij * coef[..., None]
        M = np.matmul(gq.transpose(0, 2, 1), rij)  # (n, 3, 3)
        rows = np.arange(out.shape[0])
        for k, dQ in ((0, x["dQ_da"]), (1, x["dQ_db"])):
            ax = chunk.axis[:, k]
            ok = ax >= 0
            g_axis = np.einsum("nmx,nmxy->ny", M[ok], dQ[ok])
            out[rows[ok], ax[ok]] += g_axis
        return out


def make_descriptor(params: dict, type_map: list[str]):
    """Build a descriptor from its manifest/config parameters (element names resolved via type_map)."""
    kind = params.get("type")
    if kind == "se_e2_a":
        return SeA(rcut=float(params["rcut"]), rcut_smth=float(params["rcut_smth"]), sel_=list(params["sel"]))
    if kind == "loc_frame":
        idx = {e: k for k, e in enumerate(type_map)}
        rules = []
        for elem in type_map:
            rule = params["axis_rule"][elem]
            rules.append([[idx[rule[0][0]], int(rule[0][1])], [idx[rule[1][0]], int(rule[1][1])]])
        return LocFrame(rcut=float(params["rcut"]), sel_a_=list(params["sel_a"]), sel_r_=list(params["sel_r"]), axis_rule=rules)
    raise ValueError(f"unknown descriptor type {kind!r}; allowed: 'loc_frame', 'se_e2_a'")
