"""Reads Keras weight files (`.weights.h5`) directly, for tests that compare saved weights."""

import h5py


def weight_arrays(path):
    """[(dataset name, array)] of every array in the file, in the file's order."""
    arrays = []
    with h5py.File(path) as f:
        f.visititems(
            lambda name, item: (
                arrays.append((name, item[()])) if isinstance(item, h5py.Dataset) else None
            )
        )
    return arrays
