"""Every kind of bad input gets a 4xx whose message names the field (with the frame index) and the allowed
values; never a 500, never a hang; the server keeps serving afterwards."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app

from .conftest import WATER_MOLECULE, make_settings, message

LIMITS = dict(max_atoms_per_frame=300, max_frames_per_request=5, max_atoms_per_request=400, max_body_bytes=200_000)


@pytest.fixture(scope="module")
def limited(tiny_store):
    with TestClient(create_app(make_settings(tiny_store, **LIMITS))) as c:
        yield c


def frame(**kw) -> dict:
    return {**WATER_MOLECULE, **kw}


def cubic(a: float) -> list:
    return (np.eye(3) * a).tolist()


rng = np.random.default_rng(0)

CASES = {
    # name: (body, status, fragments that the message must contain)
    "unknown_element": ({"frames": [frame(), frame(species=["O", "H", "Xx"])]}, 422,
                        ["frames[1].species[2]", "unknown element 'Xx'", "O, H"]),
    "element_the_model_lacks": ({"frames": [frame(species=["O", "H", "C"])]}, 422,
                                ["frames[0].species[2]", "'C' is not supported", "O, H"]),
    "species_not_strings": ({"frames": [frame(species=["O", "H", 8])]}, 422, ["frames[0].species[2]", "string"]),
    "species_positions_length_mismatch": ({"frames": [frame(species=["O", "H"])]}, 422,
                                          ["frames[0].positions", "3 position rows for 2 species"]),
    "positions_not_triples": ({"frames": [frame(positions=[[0, 0], [1, 0], [0, 1]])]}, 422,
                              ["frames[0].positions", "[x, y, z]", "[3, 2]"]),
    "positions_not_numbers": ({"frames": [frame(positions=[[0, 0, "a"], [1, 0, 0], [0, 1, 0]])]}, 422,
                              ["frames[0].positions", "non-numbers"]),
    "positions_ragged": ({"frames": [frame(positions=[[0, 0, 0], [1, 0], [0, 1, 0]])]}, 422,
                         ["frames[0].positions", "[x, y, z]"]),
    "non_finite_coordinates": ({"frames": [frame(positions=[[0, 0, 0], [float("nan"), 0, 0], [0, 1, 0]])]}, 422,
                               ["frames[0].positions[1]", "finite"]),
    "infinite_coordinates": ({"frames": [frame(), frame(positions=[[0, 0, 0], [1, 0, 0], [0, float("inf"), 0]])]}, 422,
                             ["frames[1].positions[2]", "finite"]),
    "absurd_coordinates": ({"frames": [frame(positions=[[0, 0, 0], [1e9, 0, 0], [0, 1, 0]])]}, 422,
                           ["frames[0].positions[1]", "100000 Angstrom", "max_abs_coordinate"]),
    "cell_not_3x3": ({"frames": [frame(cell=[[10, 0, 0], [0, 10, 0]])]}, 422, ["frames[0].cell", "3 lattice vectors", "[2, 3]"]),
    "cell_non_finite": ({"frames": [frame(cell=[[10, 0, 0], [0, float("nan"), 0], [0, 0, 10]])]}, 422,
                        ["frames[0].cell", "finite"]),
    "cell_singular": ({"frames": [frame(cell=[[10, 0, 0], [0, 10, 0], [10, 10, 0]])]}, 422,
                      ["frames[0].cell", "singular or degenerate", "linearly independent"]),
    "cell_degenerate_nearly_flat": ({"frames": [frame(cell=[[10, 0, 0], [0, 10, 0], [10, 10, 1e-7]])]}, 422,
                                    ["frames[0].cell", "degenerate"]),
    "cell_zero_vector_along_periodic_direction": ({"frames": [frame(cell=[[10, 0, 0], [0, 10, 0], [0, 0, 0]])]}, 422,
                                                  ["frames[0].cell[2]", "zero", "pbc[2]"]),
    "cell_parallel_vectors_in_a_slab": (
        {"frames": [frame(cell=[[10, 0, 0], [20, 0, 0], [0, 0, 10]], pbc=[True, True, False])]}, 422,
        ["frames[0].cell", "parallel"]),
    "pbc_without_cell": ({"frames": [frame(pbc=[True, True, True])]}, 422, ["frames[0].pbc", "needs a cell"]),
    "pbc_wrong_length": ({"frames": [frame(cell=cubic(10), pbc=[True, True])]}, 422, ["frames[0].pbc", "3"]),
    "atoms_on_top_of_each_other": ({"frames": [frame(), frame(positions=[[0, 0, 0], [0, 0, 0.01], [0, 1, 0]])]}, 422,
                                   ["frames[1].positions", "atoms 0 and 1", "min_distance"]),
    "atoms_on_top_of_each_other_across_the_cell_boundary": (
        {"frames": [frame(positions=[[0.005, 5, 5], [14.998, 5, 5], [3, 5, 5]], cell=cubic(15))]}, 422,
        ["frames[0].positions", "atoms 0 and 1", "0.007", "min_distance"]),
    "atom_on_its_own_periodic_image": ({"frames": [frame(cell=[[0.05, 0, 0], [0, 10, 0], [0, 0, 10]])]}, 422,
                                       ["frames[0]", "too"]),
    "neighbour_explosion": ({"frames": [{"species": ["H"] * 300, "positions": (rng.random((300, 3)) * 3.0).tolist(),
                                         "cell": cubic(3.0)}]}, 422,
                            ["frames[0].positions", "neighbours per atom", "max_neighbours_per_atom", "Angstrom"]),
    "no_frames": ({"frames": []}, 422, ["frames", "at least one frame"]),
    "frames_missing": ({"model": "water-se-tiny"}, 422, ["frames", "required"]),
    "empty_frame": ({"frames": [frame(), {"species": [], "positions": []}]}, 422, ["frames[1].species", "at least one atom"]),
    "unknown_property": ({"frames": [frame()], "properties": ["energy", "charges"]}, 422,
                         ["properties[1]", "'charges'", "'energy'", "'forces'", "'virial'", "'stress'", "'atomic_energies'"]),
    "no_property": ({"frames": [frame()], "properties": []}, 422, ["properties", "at least one of energy"]),
    "stress_of_an_isolated_system": ({"frames": [frame()], "properties": ["energy", "stress"]}, 422,
                                     ["properties", "stress", "frames[0]", "isolated", "virial"]),
    "stress_of_a_slab": ({"frames": [frame(cell=cubic(10), pbc=[True, True, False])], "properties": ["stress"]}, 422,
                         ["properties", "frames[0]", "[true, true, false]"]),
    "unknown_field": ({"frames": [frame(cel=cubic(10))]}, 422, ["frames[0].cel", "unknown field", "species, positions, cell, pbc"]),
    "unknown_top_level_field": ({"frames": [frame()], "propertiez": ["energy"]}, 422,
                                ["propertiez", "model, frames, properties"]),
    "model_not_a_string": ({"frames": [frame()], "model": 3}, 422, ["model", "string"]),
    "body_not_an_object": ([1, 2, 3], 422, ["body must be an object"]),
    "unknown_model": ({"frames": [frame()], "model": "nope"}, 404, ["'nope'", "water-locframe-tiny/1", "water-se-tiny/1"]),
    "unknown_model_version": ({"frames": [frame()], "model": "water-se-tiny/7"}, 404, ["'water-se-tiny/7'", "water-se-tiny/1"]),
    "too_many_frames": ({"frames": [frame()] * 6}, 413, ["frames", "max_frames_per_request = 5", "DPSERVE_MAX_FRAMES_PER_REQUEST"]),
    "too_many_atoms_in_a_frame": ({"frames": [frame(), {"species": ["H"] * 301, "positions": [[2.0 * i, 0, 0] for i in range(301)]}]},
                                  413, ["frames[1]", "301 atoms", "max_atoms_per_frame = 300"]),
    "too_many_atoms_in_a_request": ({"frames": [{"species": ["H"] * 250, "positions": [[2.0 * i, 0, 0] for i in range(250)]}] * 2},
                                    413, ["500 atoms", "max_atoms_per_request = 400"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_is_refused_with_a_message_naming_the_field(limited, name):
    body, status, fragments = CASES[name]
    r = limited.post("/predict", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == status, (name, r.status_code, r.text)
    msg = message(r)
    for frag in fragments:
        assert frag in msg, (name, frag, msg)


def test_422_keeps_fastapis_shape(limited):
    r = limited.post("/predict", json={"frames": [frame(species=["O", "H", "Xx"])]})
    detail = r.json()["detail"]
    assert isinstance(detail, list) and set(detail[0]) == {"loc", "msg", "type"}
    assert detail[0]["loc"] == ["body", "frames", 0, "species", 2]


@pytest.mark.parametrize("content,ctype,status,fragment", [
    (b'{"frames": [', "application/json", 400, "malformed JSON body"),
    (b"", "application/json", 400, "empty request body"),
    (b"\xff\xfe{", "application/json", 400, "malformed JSON body"),
    (b"\xc1", "application/msgpack", 400, "malformed msgpack body"),
    (msgpack.packb({"frames": []}) + b"\x00", "application/msgpack", 400, "malformed msgpack body"),
    (b"frames=1", "text/plain", 415, "application/json or application/msgpack"),
], ids=["truncated", "empty", "not_utf8", "msgpack_reserved_byte", "msgpack_trailing_bytes", "content_type"])
def test_malformed_body_is_a_4xx(limited, content, ctype, status, fragment):
    r = limited.post("/predict", content=content, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert fragment in message(r)


def test_deeply_nested_json_is_a_4xx(limited):
    r = limited.post("/predict", content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text


def test_body_beyond_max_body_bytes_is_413(limited):
    big = json.dumps({"frames": [frame()], "pad": "x" * 250_000})
    r = limited.post("/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert "max_body_bytes = 200000" in message(r)


@pytest.mark.parametrize("raw,fragment", [
    ({"dtype": "float64", "shape": [3, 3], "data": b"\0" * 8}, "8 bytes but shape [3, 3]"),
    ({"dtype": "int8", "shape": [3, 3], "data": b"\0" * 9}, "dtype must be 'float64' or 'float32'"),
    ({"dtype": "float64", "shape": [3, 3]}, "lacks 'data'"),
    ({"dtype": "float64", "shape": [3, -3], "data": b""}, "non-negative integers"),
    ({"dtype": "float64", "shape": [9], "data": np.zeros(9).tobytes()}, "[9]"),
])
def test_bad_raw_array_in_msgpack_is_422(limited, raw, fragment):
    body = msgpack.packb({"frames": [{"species": ["O", "H", "H"], "positions": raw}]}, use_bin_type=True)
    r = limited.post("/predict", content=body, headers={"content-type": "application/msgpack"})
    assert r.status_code == 422, r.text
    assert "frames[0].positions" in message(r) and fragment in message(r)


def test_one_bad_frame_fails_only_its_request(limited):
    ok = {"frames": [frame()]}
    bad = {"frames": [frame(), frame(species=["O", "H", "Xx"])]}
    assert limited.post("/predict", json=bad).status_code == 422
    r = limited.post("/predict", json=ok)
    assert r.status_code == 200 and len(r.json()["results"]) == 1


def test_unknown_model_on_models_route_is_404(limited):
    r = limited.get("/models/nope")
    assert r.status_code == 404 and "water-se-tiny/1" in message(r)


def test_coincident_atoms_are_refused_even_without_a_min_distance(tiny_store):
    """With min_distance = 0 every distance is allowed, except none at all (the descriptors divide by it)."""
    with TestClient(create_app(make_settings(tiny_store, min_distance=0.0))) as client:
        close = frame(species=["O", "H", "H"], positions=[[0, 0, 0], [0.05, 0, 0], [-0.24, 0.93, 0]])
        ok = client.post("/predict", json={"frames": [close]})
        assert ok.status_code == 200  # 0.05 A is allowed here, and finite (NaN would come back as null)
        assert np.isfinite(ok.json()["results"][0]["energy"]) and np.isfinite(ok.json()["results"][0]["forces"]).all()
        same = frame(species=["O", "H", "H"], positions=[[0, 0, 0], [0, 0, 0], [-0.24, 0.93, 0]])
        r = client.post("/predict", json={"frames": [same]})
        assert r.status_code == 422 and "atoms 0 and 1" in message(r) and "on top of each other" in message(r)
