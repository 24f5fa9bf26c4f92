"""Shared fixtures."""

import pytest
from omniglot_fixture import write_omniglot


@pytest.fixture(scope="session")
def full_size_omniglot(tmp_path_factory):
    """Zips with Omniglot's real counts (964 + 659 characters, 20 images) of small random images."""
    data_dir = tmp_path_factory.mktemp("omniglot")
    write_omniglot(data_dir, characters_per_part=(964, 659), image_side=28)
    return data_dir
