"""The papers' own algorithms, each a short module of rules on the seams that registers its command-line name.

* :mod:`~flatminima.variants.nsam`: n-SAM, the ascent on another, larger sample (``nsam``);
* :mod:`~flatminima.variants.rwsam`: RW-SAM, the ascent reweighted toward sharp examples (``rwsam``);
* :mod:`~flatminima.variants.escape`: Ahn et al.'s random perturbations (``ahn-rs``, ``ahn-sa``);
* :mod:`~flatminima.variants.periodic`: the SAM step every k steps or with probability p (``periodic-sam``,
  ``random-sam``);
* :mod:`~flatminima.variants.momentum_sam`: Momentum-SAM, the perturbation along the momentum (``momentum-sam``);
* :mod:`~flatminima.variants.friendly_sam`: Friendly SAM, the gradient's running mean removed (``friendly-sam``);
* :mod:`~flatminima.variants.gsam`: GSAM, the surrogate gap's descent (``gsam``);
* :mod:`~flatminima.variants.looksam`: LookSAM, SAM every k steps and its orthogonal part reused (``looksam``).
"""

from flatminima.variants.escape import OrthogonalEscape, RandomSign, SingleExample
from flatminima.variants.friendly_sam import FriendlyAscent
from flatminima.variants.gsam import GSAMDescent
from flatminima.variants.looksam import LookSAMDescent
from flatminima.variants.momentum_sam import MomentumAscent
from flatminima.variants.nsam import AscentSample
from flatminima.variants.periodic import RandomCadence, periodic_sam, random_sam, uniform_draw
from flatminima.variants.rwsam import GibbsReweighting

__all__ = [
    "AscentSample",
    "FriendlyAscent",
    "GSAMDescent",
    "GibbsReweighting",
    "LookSAMDescent",
    "MomentumAscent",
    "OrthogonalEscape",
    "RandomCadence",
    "RandomSign",
    "SingleExample",
    "periodic_sam",
    "random_sam",
    "uniform_draw",
]
