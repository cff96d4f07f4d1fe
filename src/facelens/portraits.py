"""The two public-domain portraits every default run uses, taken from installed packages.

No download and no copy in the repository: scikit-image ships Eileen Collins
(NASA) and matplotlib ships Grace Hopper (US Navy), both in their wheels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Portrait", "default_portraits"]


@dataclass(frozen=True)
class Portrait:
    name: str
    image: np.ndarray  # H×W×3 uint8 RGB
    credit: str


def default_portraits() -> list[Portrait]:
    """Eileen Collins (``skimage.data.astronaut()``) and Grace Hopper (matplotlib's sample data)."""
    import matplotlib.cbook
    import skimage.data

    from .image import load_image

    hopper = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return [
        Portrait("eileen_collins", np.ascontiguousarray(skimage.data.astronaut()),
                 "Eileen Collins, NASA, public domain (scikit-image astronaut)"),
        Portrait("grace_hopper", load_image(hopper), "Grace Hopper, US Navy, public domain (matplotlib sample data)"),
    ]
