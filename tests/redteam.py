"""Fixtures shared by the red-team suites: a pool run in both modes, and a textured image."""

import numpy as np
import pytest
from PIL import Image

from cv_env.sandbox import Sandbox

INPUT_BYTES = 8 * 1024 * 1024  # the pools' max_input_bytes: where a worker's output pixels go


@pytest.fixture(scope="module", params=[True, False], ids=["both-layers", "os-layer-only"])
def layered_sandbox(request):
    """Two workers, with both layers, then with the restricted layer switched off."""
    with Sandbox(workers=2, timeout_s=2.0, memory_mb=256, max_input_bytes=INPUT_BYTES,
                 restricted=request.param) as sb:
        yield sb


@pytest.fixture(scope="module")
def image():
    """64x48 random RGB (no symmetry: any geometry is visible in its pixels)."""
    rng = np.random.RandomState(0)
    return Image.fromarray(rng.randint(0, 255, (48, 64, 3), dtype=np.uint8))
