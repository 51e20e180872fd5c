"""The single helpers every entry point shares: location CSVs, HU <-> network range, storage."""
import numpy as np
import pytest
import torch

from utils.errors import InputFileError
from utils.hu_range import span, to_hu, to_net
from utils.locations_csv import read_locations_csv
from utils.stored import int_limits, stored_as


def test_location_rows_vox_world_and_blank(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("Filename, z ,y,x,coord\na.mhd,1,2,3,vox\nb.mhd,-1.5,2,3,world\nc.mhd,,,,\n")
    rows = read_locations_csv(p, need_filename=True, skip_blank=True)
    assert [(r.filename, r.world, r.line) for r in rows] == [("a.mhd", False, 2),
                                                             ("b.mhd", True, 3)]
    np.testing.assert_array_equal(rows[1].zyx, [-1.5, 2.0, 3.0])
    with pytest.raises(InputFileError, match="line 4"):  # a blank row is refused unless skipped
        read_locations_csv(p, need_filename=True)


@pytest.mark.parametrize("text,says", [
    ("z,y\n1,2\n", "missing column"),
    ("filename,z,y,x\na,1,2,x\n", "line 2"),
    ("filename,z,y,x,coord\na,1,2,3,mm\n", "vox or world"),
    ("filename,z,y,x\n", "no rows"),
    ("z,y,x\n1,2,3\n", "filename"),
])
def test_location_csv_refusals_are_one_line(tmp_path, text, says):
    p = tmp_path / "l.csv"
    p.write_text(text)
    with pytest.raises(InputFileError, match=says) as e:
        read_locations_csv(p, need_filename=True)
    assert "\n" not in str(e.value) and "l.csv" in str(e.value)
    with pytest.raises(InputFileError, match="not found"):
        read_locations_csv(tmp_path / "none.csv")


def test_hu_and_network_range_invert_each_other_on_arrays_and_tensors():
    hu = np.array([-1024.0, -500.0, 0.0, 3071.0])
    v = to_net(hu, -1024.0, 3071.0)
    assert v.min() == -1.0 and v.max() == 1.0
    np.testing.assert_allclose(to_hu(v, -1024.0, 3071.0), hu, atol=1e-9)
    t = to_hu(torch.from_numpy(v), -1024.0, 3071.0)
    np.testing.assert_allclose(t.numpy(), hu, atol=1e-9)


def test_a_constant_volume_maps_without_dividing_by_zero():
    assert span(40.0, 40.0) == 1.0 and span(0.0, 0.5) == 0.5
    v = to_net(np.full(3, 40.0), 40.0, 40.0)
    assert np.all(v == -1.0) and np.all(to_hu(v, 40.0, 40.0) == 40.0)


def test_stored_rounds_half_to_even_and_clips_to_the_integer_type():
    got = stored_as(np.array([0.5, 1.5, -2.5, 40000.0, -40000.0]), np.int16)
    assert got.dtype == np.int16 and got.tolist() == [0, 2, -2, 32767, -32768]
    f = np.array([0.25, 1.75], np.float64)
    assert stored_as(f, np.float32).tolist() == [0.25, 1.75]
    assert int_limits(np.uint8) == (0, 255) and int_limits(np.float32) is None
