"""Bridge from i-PI to dpserve: a driver of i-PI's socket protocol that gets its forces over HTTP.

i-PI (https://ipi-code.org) propagates the nuclei (NVE, NVT, NPT, path integrals, ...) and is the socket
*server*; force codes ("drivers") connect to it. This bridge is such a driver: for every structure i-PI
sends, it POSTs one /predict to dpserve and sends the energy, forces and virial back.

Protocol (read from i-PI 3.3's ``ipi/interfaces/sockets.py`` and its reference Python driver
``i-pi-py_driver`` / ``drivers/py/driver.py``). Every message starts with a 12-byte header, an ASCII word
padded with spaces; numbers are native (little-endian) int32 and float64::

    i-PI -> driver                              driver -> i-PI
    STATUS                                      NEEDINIT | READY | HAVEDATA
    INIT  int32 rid, int32 len, bytes[len]      (nothing)
    POSDATA  float64[9] h, float64[9] h^-1,     (nothing: the bridge computes now)
             int32 natoms, float64[3 natoms] q
    GETFORCE                                    FORCEREADY, float64 U, int32 natoms,
                                                float64[3 natoms] f, float64[9] virial,
                                                int32 len, bytes[len] extra
    EXIT                                        (the bridge returns)

All in atomic units: Bohr, Hartree, Hartree/Bohr. i-PI may fuse POSDATA and GETFORCE into one send
(``consolidate_messages``); the bridge reads a byte stream message by message, so that changes nothing.
With ``<batch_size>`` > 1 i-PI announces ``batch_size:B`` in the INIT string and then sends
``POSDATA, int32 natoms, B x (h, h^-1), float64[B, 3 natoms] q`` and expects ``FORCEREADY, float64[B] U,
int32 natoms, float64[B, 3 natoms] f, float64[B, 9] virials, B x (int32 len, extra)``; the bridge sends
the B structures as the frames of a single /predict (one HTTP round trip for all beads).

Conventions, checked against the i-PI source:

* Cell. i-PI stores the cell ``h`` with the lattice vectors as *columns* (upper triangular) and sends
  ``h.tobytes()`` (C order). Read back as a C-ordered (3, 3) array that is ``h`` again, so the lattice
  vectors as rows, as dpserve and ASE want them, are ``h.T``. i-PI's own ASE driver
  (``ipi/pes/_ase.py``, ``convert_units``) does exactly this: ``cell = unit_to_user(..., cell.T)``
  with the comment "ASE expects cell-vectors-as-rows". The inverse cell is not needed.
* Virial. i-PI's ASE driver (``ipi/pes/_ase.py``, ``post_process``) sends ``vir = (-stress * V).T`` with
  ASE's stress sigma = (1/V) dE/d(epsilon). So i-PI wants Xi = -sigma V = -dE/d(epsilon), which is exactly
  dpserve's virial (design.md: Xi = -dE/d(epsilon), stress = -Xi / V), in Hartree: no sign change, only
  the unit and the transpose that the column-vector cell implies (a no-op for the symmetric virial of a
  rotation-invariant model, kept for exactness). i-PI adds the kinetic part itself, so P = (2K + tr Xi)/3V.
* Units use ASE's constants (``ase.units.Bohr``, ``ase.units.Hartree``, CODATA 2014); i-PI's own
  ``ipi/utils/units.py`` rounds them to 8 digits (1 eV = 0.036749326 Ha, 1 A = 1.8897261 Bohr), so
  energies i-PI prints *in eV or Angstrom* differ from dpserve's by about 1e-7 relative; in atomic units
  they agree to round-off.

Species: the protocol carries no elements. The bridge takes them from ``--init-file`` (any file ASE can
read, e.g. the xyz i-PI starts from, atoms in the same order) or, failing that, from a ``species`` entry of
the ffsocket's ``<parameters>`` (sent in INIT), e.g. ``<parameters>{species: O H H O H H}</parameters>``.

Periodicity: i-PI always has a cell, and condensed-phase simulations are periodic, so the cell is sent
with pbc = (True, True, True) unless ``isolated`` is set (a molecule or cluster: no cell is sent).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from ase.units import Bohr, Hartree

from app.client import Client, DPServeError

__all__ = ["HDRLEN", "IPIBridge", "ProtocolError", "connect", "read_species", "run", "write_ipi_xyz"]

log = logging.getLogger("dpserve.ipi")

HDRLEN = 12
BOHR = Bohr  # Angstrom per Bohr
HARTREE = Hartree  # eV per Hartree
FORCE_AU = Hartree / Bohr  # eV/A per Hartree/Bohr


def _header(word: str) -> bytes:
    return word.upper().ljust(HDRLEN).encode()


STATUS, INIT, POSDATA, GETFORCE, EXIT = (_header(w) for w in ("STATUS", "INIT", "POSDATA", "GETFORCE", "EXIT"))
NEEDINIT, READY, HAVEDATA, FORCEREADY = (_header(w) for w in ("NEEDINIT", "READY", "HAVEDATA", "FORCEREADY"))


class ProtocolError(RuntimeError):
    """i-PI sent something the protocol does not allow here, or the connection broke mid-message."""


def read_species(path: str | Path) -> list[str]:
    """Element symbols, in file order, of the first frame of a structure file ASE can read."""
    from ase.io import read

    return read(str(path), index=0).get_chemical_symbols()


def write_ipi_xyz(atoms, path: str | Path) -> None:
    """Write ASE Atoms as an i-PI xyz init file, in full precision, that both i-PI and ASE read.

    Comment line ``# CELL{H}: h11 h12 ... h33 cell{angstrom} positions{angstrom}``: i-PI reads the nine
    numbers row by row into its h, whose *columns* are the lattice vectors (``ipi/utils/io/backends/
    io_xyz.py``, ``read_xyz``), and it wants h upper triangular. So the rows-cell is first brought to
    ASE's lower-triangular standard form (a along x, b in the xy plane: a rigid rotation of cell and
    atoms, which changes no energy) and h = cell.T is written. Atoms without a full 3D cell are refused:
    i-PI always has a box (give a molecule one, e.g. ``atoms.center(vacuum=10)``, and run the bridge with
    ``--isolated``).
    """
    if atoms.cell.rank != 3:
        raise ValueError("i-PI needs a 3D cell: give the structure a box (e.g. atoms.center(vacuum=10.0))")
    a = atoms.copy()
    lower, _ = a.cell.standard_form()  # rows a, b, c with a along x, b in the xy plane
    a.set_cell(lower, scale_atoms=True)  # rotates the atoms with the cell (same fractional coordinates)
    h = np.asarray(a.cell.array).T  # (3, 3) upper triangular, lattice vectors as columns
    lines = [f"{len(a)}",
             "# CELL{H}: " + " ".join(f"{x:.12f}" for x in h.reshape(-1)) + " cell{angstrom} positions{angstrom}"]
    lines += [f"{s:2s} {x:20.12f} {y:20.12f} {z:20.12f}" for s, (x, y, z) in zip(
        a.get_chemical_symbols(), a.positions, strict=True)]
    Path(path).write_text("\n".join(lines) + "\n")


def parse_init(text: str) -> dict[str, str]:
    """i-PI's INIT string (``" key : value , key : value , "``, from the ffsocket's ``<parameters>``, plus
    ``batch_size:B`` when batching) -> {key: value}."""
    out = {}
    for token in text.split(","):
        key, sep, value = token.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def connect(address: str | None = None, port: int | None = None, unix: str | None = None,
            sockets_prefix: str = "/tmp/ipi_", wait: float = 60.0) -> socket.socket:
    """Connect to i-PI: TCP ``address:port``, or the unix socket ``sockets_prefix + unix`` (i-PI's naming;
    a ``unix`` name holding a '/' is taken as a whole path). Retries for ``wait`` seconds, since i-PI
    may still be starting."""
    if unix is not None:
        path = unix if "/" in unix else sockets_prefix + unix
        family, target = socket.AF_UNIX, path
    elif address is not None and port is not None:
        family, target = socket.AF_INET, (address, int(port))
    else:
        raise ValueError("give either unix=NAME or address=HOST and port=PORT")
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect(target)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise ConnectionError(f"i-PI is not listening at {target} ({exc})") from exc
            time.sleep(0.2)
            continue
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small messages, latency-bound
        return sock


class IPIBridge:
    """One i-PI client connection, served until i-PI says EXIT or closes the socket.

    ``client``: the dpserve :class:`~app.client.Client` (its keep-alive connection serves every step);
    ``species``: element symbols in i-PI's atom order (None: from INIT's ``species``); ``model``: model name
    (None: the client's or the server's default); ``isolated``: send no cell (molecules, clusters).
    """

    def __init__(self, client: Client, species: Sequence[str] | None = None, model: str | None = None,
                 isolated: bool = False, on_step: Callable[[dict], None] | None = None):
        self.client = client
        self.species = list(species) if species is not None else None
        self.model = model
        self.isolated = isolated
        self.on_step = on_step  # called with each structure's results in eV/A (tests, logging)
        self.batch = 1
        self.steps = 0  # structures evaluated
        self._initialised = False
        self._pending: list[tuple[float, np.ndarray, np.ndarray]] | None = None  # (U, f, vir) in a.u.
        self._natoms = 0

    # -- wire -------------------------------------------------------------------------------------------

    def _recv(self, sock: socket.socket, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ProtocolError(f"i-PI closed the connection in the middle of a message ({got}/{n} bytes)")
            got += k
        return bytes(buf)

    def _recv_array(self, sock, dtype, count: int) -> np.ndarray:
        dt = np.dtype(dtype)
        return np.frombuffer(self._recv(sock, dt.itemsize * count), dtype=dt).copy()

    def _recv_int(self, sock) -> int:
        return int(self._recv_array(sock, np.int32, 1)[0])

    # -- physics ----------------------------------------------------------------------------------------

    def compute(self, cells_h: np.ndarray, positions: np.ndarray) -> list[tuple[float, np.ndarray, np.ndarray]]:
        """Structures in i-PI's units and layout -> [(U Hartree, forces (N*3,) Hartree/Bohr, virial (3, 3)
        Hartree)], one per structure.

        ``cells_h`` (B, 3, 3) Bohr, i-PI's h with lattice vectors as columns; ``positions`` (B, N, 3) Bohr.
        """
        nstruct, natoms = positions.shape[:2]
        species = self._species(natoms)
        frames = []
        for h, q in zip(cells_h, positions, strict=True):
            frame = {"species": species, "positions": q * BOHR}  # (N, 3) A
            if not self.isolated:
                cell = h.T * BOHR  # (3, 3) A, lattice vectors as rows
                if abs(np.linalg.det(cell)) < 1e-6:
                    raise ValueError("i-PI sent a singular cell: for a molecule or cluster, run the bridge "
                                     "with --isolated (no cell is then sent to the service)")
                frame.update(cell=cell, pbc=[True, True, True])
            frames.append(frame)
        results = self.client.predict(frames, properties=["energy", "forces", "virial"], model=self.model)
        out = []
        for r in results:
            if self.on_step is not None:
                self.on_step(r)
            u = r["energy"] / HARTREE
            f = (r["forces"] / FORCE_AU).reshape(-1)  # (3N,) Hartree/Bohr
            vir = np.ascontiguousarray((r["virial"] / HARTREE).T)  # (3, 3) Hartree, i-PI's (column) layout
            out.append((u, f, vir))
        self.steps += nstruct
        return out

    def _species(self, natoms: int) -> list[str]:
        if self.species is None:
            raise ValueError("the bridge needs the element symbols: give --init-file (the structure i-PI "
                             "starts from) or a 'species' entry in the ffsocket's <parameters>")
        if len(self.species) != natoms:
            raise ValueError(f"i-PI sent {natoms} atoms but the bridge has {len(self.species)} species "
                             "(is the init file the one i-PI starts from?)")
        return self.species

    # -- protocol ---------------------------------------------------------------------------------------

    def serve(self, sock: socket.socket) -> int:
        """Answer i-PI on ``sock`` until EXIT (or a clean close between messages); returns the number of
        structures evaluated. A failing /predict raises (and the caller closes the socket, which i-PI sees
        as a lost client) rather than feeding i-PI wrong forces."""
        while True:
            try:
                header = self._recv(sock, HDRLEN)
            except ProtocolError:
                log.info("i-PI closed the connection")
                return self.steps
            if header == STATUS:
                sock.sendall(NEEDINIT if not self._initialised else HAVEDATA if self._pending else READY)
            elif header == INIT:
                self._init(sock)
            elif header == POSDATA:
                self._posdata(sock)
            elif header == GETFORCE:
                self._getforce(sock)
            elif header == EXIT:
                log.info("i-PI sent EXIT after %d structures", self.steps)
                return self.steps
            else:
                raise ProtocolError(f"unexpected message from i-PI: {header!r}")

    def _init(self, sock) -> None:
        self._recv_int(sock)  # replica index: the bridge is stateless, it serves any replica
        text = self._recv(sock, self._recv_int(sock)).decode("utf-8", errors="replace")
        pars = parse_init(text)
        if "batch_size" in pars:
            self.batch = int(pars["batch_size"])
        if self.species is None and pars.get("species"):
            self.species = pars["species"].split()
        if self.model is None and pars.get("model"):
            self.model = pars["model"]
        log.info("INIT from i-PI: %r (batch %d)", text.strip(), self.batch)
        self._initialised = True

    def _posdata(self, sock) -> None:
        if self.batch == 1:
            h = self._recv_array(sock, np.float64, 9).reshape(1, 3, 3)
            self._recv_array(sock, np.float64, 9)  # h^-1
            natoms = self._recv_int(sock)
            q = self._recv_array(sock, np.float64, 3 * natoms).reshape(1, natoms, 3)
        else:
            natoms = self._recv_int(sock)
            cells = self._recv_array(sock, np.float64, 18 * self.batch).reshape(self.batch, 2, 3, 3)
            h = cells[:, 0]
            q = self._recv_array(sock, np.float64, 3 * natoms * self.batch).reshape(self.batch, natoms, 3)
        self._natoms = natoms
        self._pending = self.compute(h, q)

    def _getforce(self, sock) -> None:
        if not self._pending:
            raise ProtocolError("i-PI asked for forces before sending positions")
        n = self._natoms
        extra = b""
        if self.batch == 1:
            u, f, vir = self._pending[0]
            sock.sendall(FORCEREADY + np.float64(u).tobytes() + np.int32(n).tobytes()
                         + np.ascontiguousarray(f, dtype=np.float64).tobytes()
                         + np.ascontiguousarray(vir, dtype=np.float64).tobytes()
                         + np.int32(len(extra)).tobytes() + extra)
        else:
            us = np.array([p[0] for p in self._pending], dtype=np.float64)
            fs = np.stack([p[1] for p in self._pending]).astype(np.float64)  # (B, 3N)
            virs = np.stack([p[2] for p in self._pending]).astype(np.float64)  # (B, 3, 3)
            sock.sendall(FORCEREADY + us.tobytes() + np.int32(n).tobytes() + fs.tobytes() + virs.tobytes()
                         + b"".join(np.int32(len(extra)).tobytes() + extra for _ in self._pending))
        self._pending = None


def run(server: str, species: Sequence[str] | None = None, model: str | None = None, *,
        address: str | None = None, port: int | None = None, unix: str | None = None,
        sockets_prefix: str = "/tmp/ipi_", isolated: bool = False, encoding: str = "msgpack",
        wait: float = 60.0) -> int:
    """Connect to dpserve at ``server`` and to i-PI, and serve i-PI until it ends; returns the number of
    structures evaluated."""
    with Client(server, encoding=encoding) as client:
        if not _wait_ready(client, wait):
            raise DPServeError(f"dpserve at {server} is not ready (GET /ready) after {wait:.0f} s")
        bridge = IPIBridge(client, species=species, model=model, isolated=isolated)
        sock = connect(address, port, unix, sockets_prefix=sockets_prefix, wait=wait)
        try:
            return bridge.serve(sock)
        finally:
            sock.close()


def _wait_ready(client: Client, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while not client.ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
