"""Reading variables from MATLAB files, both v5 (scipy) and v7.3 (HDF5, as h5py sees it)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.io

from common.errors import InputError


def read_mat_variables(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Read `names` from a .mat file as 2-D arrays with one row per item.

    MATLAB v7.3 files are HDF5 and store matrices column-major, so h5py sees them transposed;
    they are transposed back here. Raises InputError when the file or a variable is missing.
    """
    if not path.is_file():
        raise InputError(f"expected file {str(path)!r}, but it does not exist")
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            missing = [n for n in names if n not in f]
            if missing:
                raise InputError(f"expected variables {missing} in {str(path)!r}, got {list(f)}")
            return {n: np.asarray(f[n][()]).T for n in names}
    try:
        mat = scipy.io.loadmat(path, variable_names=names)
    except (ValueError, OSError, TypeError) as err:
        raise InputError(f"expected a MATLAB file at {str(path)!r}, got: {err}") from err
    missing = [n for n in names if n not in mat]
    if missing:
        raise InputError(f"expected variables {missing} in {str(path)!r}")
    return {n: np.atleast_2d(np.asarray(mat[n])) for n in names}
