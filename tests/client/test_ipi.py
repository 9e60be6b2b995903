"""The i-PI bridge: protocol and units against a fake i-PI over a unix socket, and a real i-PI NVE run.

The fake i-PI writes what ``ipi/interfaces/sockets.py`` (i-PI 3.3) writes: h (lattice vectors as columns)
and h^-1 as C-order float64, natoms, positions in Bohr; it reads FORCEREADY, U (Hartree), natoms, forces
(Hartree/Bohr), virial (Hartree) and the extra string. The structure is a sheared (triclinic,
non-symmetric) box, so that a transposed cell would be a different structure with a different energy.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from ase.io import read
from ase.units import Bohr, Hartree

from app.client import Client
from app.ipi import EXIT, GETFORCE, HDRLEN, INIT, POSDATA, STATUS, IPIBridge, connect, write_ipi_xyz
from tests.client.conftest import LOCFRAME, ROOT, SE, sheared_box, water_box

HAS_IPI = shutil.which("i-pi") is not None


def _recv(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        assert part, "bridge closed the connection"
        buf += part
    return buf


def _posdata(atoms) -> bytes:
    h = atoms.cell.array.T / Bohr  # (3, 3) Bohr, columns = lattice vectors (i-PI's h)
    q = atoms.positions / Bohr
    return (POSDATA + h.tobytes() + np.linalg.inv(h).tobytes() + np.int32(len(atoms)).tobytes()
            + q.tobytes())


def _forceready(sock, natoms: int, batch: int = 1):
    """Read FORCEREADY and its payload -> (U (batch,), forces (batch, N, 3), virials (batch, 3, 3), extras)."""
    assert _recv(sock, HDRLEN) == b"FORCEREADY  "
    u = np.frombuffer(_recv(sock, 8 * batch), np.float64)
    assert np.frombuffer(_recv(sock, 4), np.int32)[0] == natoms
    f = np.frombuffer(_recv(sock, 24 * natoms * batch), np.float64).reshape(batch, natoms, 3)
    vir = np.frombuffer(_recv(sock, 72 * batch), np.float64).reshape(batch, 3, 3)
    extras = []
    for _ in range(batch if batch > 1 else 1):
        n = np.frombuffer(_recv(sock, 4), np.int32)[0]
        extras.append(_recv(sock, n) if n else b"")
    return u, f, vir, extras


def _run_fake_ipi(tmp_path, bridge: IPIBridge, script, inet: bool = False):
    """Listen on a unix socket (or a loopback TCP port) like i-PI, run ``script(conn)`` in a thread, serve
    it with ``bridge`` here; returns (structures evaluated, what the script returned)."""
    if inet:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind(("127.0.0.1", 0))
        where = {"address": "127.0.0.1", "port": server.getsockname()[1]}
    else:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(tmp_path / "ipi_sock"))
        where = {"unix": str(tmp_path / "ipi_sock")}
    server.listen(1)
    out, errors = {}, []

    def ipi():
        conn, _ = server.accept()
        try:
            out["value"] = script(conn)
        except BaseException as e:  # reported in the main thread
            errors.append(e)
        finally:
            conn.close()

    t = threading.Thread(target=ipi, daemon=True)
    t.start()
    sock = connect(**where, wait=5)
    try:
        steps = bridge.serve(sock)
    finally:
        sock.close()
        t.join(10)
        server.close()
    if errors:
        raise errors[0]
    return steps, out["value"]


def _predict(app_client, atoms, model=SE):
    return Client(http_client=app_client).predict(atoms, properties=["energy", "forces", "virial"], model=model)


@pytest.mark.parametrize("model", [SE, LOCFRAME])
def test_bridge_speaks_the_protocol_and_converts_units(app_client, tmp_path, model):
    atoms = sheared_box()
    moved = atoms.copy()
    moved.positions += np.random.default_rng(0).normal(scale=0.01, size=moved.positions.shape)
    n = len(atoms)

    def script(conn):
        conn.sendall(STATUS)
        assert _recv(conn, HDRLEN) == b"NEEDINIT    "
        init = b" , "
        conn.sendall(INIT + np.int32(0).tobytes() + np.int32(len(init)).tobytes() + init)
        conn.sendall(STATUS)
        assert _recv(conn, HDRLEN) == b"READY       "
        conn.sendall(_posdata(atoms))
        conn.sendall(STATUS)
        assert _recv(conn, HDRLEN) == b"HAVEDATA    "
        conn.sendall(GETFORCE)
        first = _forceready(conn, n)
        # i-PI's consolidated mode: POSDATA and GETFORCE in one send, no STATUS in between
        conn.sendall(_posdata(moved) + GETFORCE)
        second = _forceready(conn, n)
        conn.sendall(STATUS)
        assert _recv(conn, HDRLEN) == b"READY       "
        conn.sendall(EXIT)
        return first, second

    client = Client(http_client=app_client, encoding="msgpack")
    steps, (first, second) = _run_fake_ipi(tmp_path, IPIBridge(client, atoms.get_chemical_symbols(), model), script)
    assert steps == 2
    for (u, f, vir, extras), a in ((first, atoms), (second, moved)):
        ref = _predict(app_client, a, model)
        assert u[0] * Hartree == pytest.approx(ref["energy"], rel=1e-13)
        np.testing.assert_allclose(f[0] * Hartree / Bohr, ref["forces"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(vir[0].T * Hartree, ref["virial"], rtol=1e-12, atol=1e-12)
        assert extras == [b""]
    # the test can tell a transposed cell (the bug it guards against): same positions, other periodic
    # images, other energy and forces
    wrong = atoms.copy()
    wrong.set_cell(atoms.cell.array.T, scale_atoms=False)
    bad = _predict(app_client, wrong, model)
    assert abs(bad["energy"] - first[0][0] * Hartree) > 1e-2
    assert np.abs(bad["forces"] - first[1][0] * Hartree / Bohr).max() > 1e-2


def test_bridge_batched_protocol_sends_all_beads_in_one_request(app_client, tmp_path):
    """With <batch_size>2</batch_size> i-PI announces batch_size:2 in INIT and sends two structures."""
    a1, a2 = sheared_box(), water_box()
    a2.positions[5] += 0.05
    n = len(a1)

    def script(conn):
        conn.sendall(STATUS)
        assert _recv(conn, HDRLEN) == b"NEEDINIT    "
        init = b" batch_size:2"
        conn.sendall(INIT + np.int32(0).tobytes() + np.int32(len(init)).tobytes() + init)
        payload = POSDATA + np.int32(n).tobytes()
        for a in (a1, a2):
            h = a.cell.array.T / Bohr
            payload += h.tobytes() + np.linalg.inv(h).tobytes()
        payload += (a1.positions / Bohr).tobytes() + (a2.positions / Bohr).tobytes()
        conn.sendall(payload + GETFORCE)
        res = _forceready(conn, n, batch=2)
        conn.sendall(EXIT)
        return res

    calls = []
    client = Client(http_client=app_client, encoding="msgpack")
    bridge = IPIBridge(client, a1.get_chemical_symbols(), SE, on_step=calls.append)
    steps, (u, f, vir, extras) = _run_fake_ipi(tmp_path, bridge, script)
    assert steps == 2 and len(calls) == 2 and extras == [b"", b""]
    for k, a in enumerate((a1, a2)):
        ref = _predict(app_client, a)
        assert u[k] * Hartree == pytest.approx(ref["energy"], rel=1e-13)
        np.testing.assert_allclose(f[k] * Hartree / Bohr, ref["forces"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(vir[k].T * Hartree, ref["virial"], rtol=1e-12, atol=1e-12)


def test_bridge_takes_species_and_model_from_the_init_string_over_tcp(app_client, tmp_path):
    atoms = water_box()

    def script(conn):
        conn.sendall(STATUS)
        _recv(conn, HDRLEN)
        init = (" species : " + " ".join(atoms.get_chemical_symbols()) + f" , model : {LOCFRAME} , ").encode()
        conn.sendall(INIT + np.int32(3).tobytes() + np.int32(len(init)).tobytes() + init)
        conn.sendall(_posdata(atoms) + GETFORCE)
        res = _forceready(conn, len(atoms))
        conn.sendall(EXIT)
        return res

    bridge = IPIBridge(Client(http_client=app_client))
    _, (u, _, _, _) = _run_fake_ipi(tmp_path, bridge, script, inet=True)
    assert bridge.model == LOCFRAME
    assert u[0] * Hartree == pytest.approx(_predict(app_client, atoms, LOCFRAME)["energy"], rel=1e-13)


def test_bridge_refuses_an_atom_count_that_does_not_match_its_species(app_client, tmp_path):
    atoms = water_box()

    def script(conn):
        conn.sendall(STATUS)
        _recv(conn, HDRLEN)
        conn.sendall(INIT + np.int32(0).tobytes() + np.int32(0).tobytes())
        conn.sendall(_posdata(atoms))
        return conn.recv(1)  # b"": the bridge hung up instead of answering

    with pytest.raises(ValueError, match="192 atoms but the bridge has 3 species"):
        _run_fake_ipi(tmp_path, IPIBridge(Client(http_client=app_client), ["O", "H", "H"]), script)


def test_cli_refuses_a_malformed_address(capsys):
    from app.cli import main

    assert main(["ipi", "--address", "localhost", "--server", "http://127.0.0.1:9"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_ipi_xyz_keeps_the_structure(tmp_path):
    atoms = sheared_box()
    atoms.rotate(30, "z", rotate_cell=True)  # not in standard form: the writer must rotate it back
    path = tmp_path / "init.xyz"
    write_ipi_xyz(atoms, path)
    back = read(path)
    assert back.get_chemical_symbols() == atoms.get_chemical_symbols()
    line = path.read_text().splitlines()[1]
    h = np.array(line.split("CELL{H}:")[1].split()[:9], float).reshape(3, 3)
    assert np.allclose(np.tril(h, -1), 0)  # upper triangular, as i-PI wants
    back.set_cell(h.T, scale_atoms=False)
    back.pbc = True
    np.testing.assert_allclose(back.cell.cellpar(), atoms.cell.cellpar(), atol=1e-9)
    np.testing.assert_allclose(back.get_all_distances(mic=True)[0], atoms.get_all_distances(mic=True)[0], atol=1e-9)


# -- the real thing ---------------------------------------------------------------------------------------

IPI_INPUT = """<simulation verbosity="low" safe_stride="1000" floatformat="%.16e" sockets_prefix="{prefix}">
  <output prefix="sim">
    <properties stride="1" filename="out"> [ step, potential, conserved ] </properties>
    <trajectory filename="pos" stride="1" format="ase"> positions </trajectory>
    <trajectory filename="frc" stride="1" format="ase"> forces </trajectory>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>12345</seed></prng>
  <ffsocket name="dpserve" mode="unix" pbc="false">
    <address>{name}</address>
    <latency>1e-4</latency>
    <timeout>60</timeout>
  </ffsocket>
  <system>
    <initialize nbeads="1">
      <file mode="xyz"> init.xyz </file>
      <velocities mode="thermal" units="kelvin"> 300 </velocities>
    </initialize>
    <forces><force forcefield="dpserve"/></forces>
    <ensemble><temperature units="kelvin"> 300 </temperature></ensemble>
    <motion mode="dynamics">
      <dynamics mode="nve"><timestep units="femtosecond"> 0.5 </timestep></dynamics>
    </motion>
  </system>
</simulation>
"""


@pytest.mark.skipif(not HAS_IPI, reason="i-PI is not installed (pip install ipi)")
def test_real_ipi_nve_energies_equal_predict(live_server, tmp_path):
    """i-PI runs 4 NVE steps of the sheared water box through `dpserve ipi`; the potential energies and
    forces it records (atomic units) equal /predict's for the positions it records."""
    steps = 4
    atoms = sheared_box()
    write_ipi_xyz(atoms, tmp_path / "init.xyz")
    name = f"dpserve-{os.getpid()}"
    (tmp_path / "input.xml").write_text(IPI_INPUT.format(prefix=f"{tmp_path}/", name=name, steps=steps))
    ipi = subprocess.Popen(["i-pi", "input.xml"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    bridge = None
    try:
        bridge = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "ipi", "--unix", name, "--sockets-prefix", f"{tmp_path}/",
             "--server", live_server, "--model", SE, "--init-file", str(tmp_path / "init.xyz"), "--wait", "30"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ipi_out, _ = ipi.communicate(timeout=60)
        bridge_out, _ = bridge.communicate(timeout=20)
    finally:
        for p in (ipi, bridge):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert ipi.returncode == 0, ipi_out[-3000:]
    assert bridge.returncode == 0, bridge_out[-3000:]
    assert f"{steps + 1} structures" in bridge_out  # the initial forces, then one per step

    rows = np.loadtxt(tmp_path / "sim.out", ndmin=2)  # step, potential (Hartree), conserved (Hartree)
    frames = read(tmp_path / "sim.pos_0.extxyz", index=":")
    forces = read(tmp_path / "sim.frc_0.extxyz", index=":")
    assert len(rows) == len(frames) == len(forces) == steps + 1
    # extxyz trajectories are in Angstrom and eV/A, converted by i-PI with its own constants: undo them to
    # get what i-PI held (atomic units), then convert as the bridge does (ASE's constants)
    from ipi.utils.units import unit_to_internal

    with Client(live_server, encoding="msgpack", model=SE) as c:
        for row, frame, frc in zip(rows, frames, forces, strict=True):
            a = atoms.copy()
            a.set_cell(unit_to_internal("length", "angstrom", frame.cell.array) * Bohr)
            a.positions = unit_to_internal("length", "angstrom", frame.positions) * Bohr
            ref = c.predict(a, properties=["energy", "forces"])
            # positions are written with 8 decimals: 192 atoms x |F| x 5e-9 A bounds the difference
            assert row[1] * Hartree == pytest.approx(ref["energy"], abs=2e-6)
            f_au = unit_to_internal("force", "ev/ang", frc.get_forces())  # (N, 3) Hartree/Bohr
            np.testing.assert_allclose(f_au * Hartree / Bohr, ref["forces"], atol=1e-6)
    # NVE: over 2 fs the conserved quantity stays put to well below kT per atom (tiny model, smooth se_e2_a)
    assert np.ptp(rows[:, 2]) * Hartree / len(atoms) < 1e-3
