"""The papers' own algorithms, each a short module of rules on the seams that registers its command-line name.

* :mod:`~flatminima.variants.nsam`: n-SAM, the ascent on another, larger sample (``nsam``);
* :mod:`~flatminima.variants.rwsam`: RW-SAM, the ascent reweighted toward sharp examples (``rwsam``);
* :mod:`~flatminima.variants.escape`: Ahn et al.'s random perturbations (``ahn-rs``, ``ahn-sa``).
"""

from flatminima.variants.escape import OrthogonalEscape, RandomSign, SingleExample
from flatminima.variants.nsam import AscentSample
from flatminima.variants.rwsam import GibbsReweighting

__all__ = ["AscentSample", "GibbsReweighting", "OrthogonalEscape", "RandomSign", "SingleExample"]
