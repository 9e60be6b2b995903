"""The MD examples run, as documented, against a local server (a few steps each)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.client.conftest import ROOT, SE
from tests.client.test_ipi import HAS_IPI

EXAMPLES = ROOT / "examples"


def _run(args, timeout=60, **kw):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, **kw)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_ase_nve_example(live_server, tmp_path):
    out = _run([EXAMPLES / "ase_nve_water.py", "--url", live_server, "--model", SE, "--steps", "4", "--every", "1",
                "--log", tmp_path / "nve.csv"])
    assert "total energy: change" in out and "5 requests for 4 steps" in out
    assert len((tmp_path / "nve.csv").read_text().splitlines()) == 1 + 5  # header, steps 0..4


def test_ase_nvt_example(live_server):
    out = _run([EXAMPLES / "ase_nvt_water.py", "--url", live_server, "--model", SE, "--steps", "4",
                "--encoding", "json"])
    assert "mean temperature over the second half" in out


@pytest.mark.skipif(not HAS_IPI, reason="i-PI is not installed (pip install ipi)")
def test_ipi_example(live_server, tmp_path):
    """examples/ipi as its README says, shortened to 3 steps and moved to its own directory and socket."""
    _run([EXAMPLES / "ipi" / "make_init.py", "--out", tmp_path / "water_192.xyz"])
    xml = (EXAMPLES / "ipi" / "input.xml").read_text()
    name = f"example-{os.getpid()}"
    for old, new in (("<total_steps> 200 </total_steps>", "<total_steps> 3 </total_steps>"),
                     ("<address> dpserve </address>", f"<address> {name} </address>"),
                     ("<simulation ", f'<simulation sockets_prefix="{tmp_path}/" ')):
        assert old in xml
        xml = xml.replace(old, new)
    (tmp_path / "input.xml").write_text(xml)
    ipi = subprocess.Popen(["i-pi", "input.xml"], cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        out = _run(["-m", "app.cli", "ipi", "--unix", name, "--sockets-prefix", f"{tmp_path}/", "--server",
                    live_server, "--model", SE, "--init-file", tmp_path / "water_192.xyz", "--wait", "30"])
        ipi_out, _ = ipi.communicate(timeout=30)
    finally:
        if ipi.poll() is None:
            ipi.kill()
            ipi.wait()
    assert ipi.returncode == 0, ipi_out[-3000:]
    assert "4 structures" in out
    rows = [line.split() for line in (tmp_path / "water.out").read_text().splitlines() if not line.startswith("#")]
    assert len(rows) == 4 and all(len(r) == 7 for r in rows)
