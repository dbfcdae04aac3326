"""The papers' own algorithms, each a short module of rules on the seams that registers its command-line name.

* ``nsam``: n-SAM, the ascent on another, larger sample (``nsam``);
* ``rwsam``: RW-SAM, the ascent reweighted toward sharp examples (``rwsam``);
* ``escape``: Ahn et al.'s random perturbations (``ahn-rs``, ``ahn-sa``);
* ``periodic``: the SAM step every k steps or with probability p (``periodic-sam``,
  ``random-sam``);
* ``momentum_sam``: Momentum-SAM, the perturbation along the momentum (``momentum-sam``);
* ``friendly_sam``: Friendly SAM, the gradient's running mean removed (``friendly-sam``);
* ``gsam``: GSAM, the surrogate gap's descent (``gsam``);
* ``looksam``: LookSAM, SAM every k steps and its orthogonal part reused (``looksam``);
* ``esam``: ESAM, stochastic weight perturbation and sharpness-sensitive data selection
  (``esam``);
* ``aesam``: AE-SAM, SAM's step only where ||g||^2 is high against its running statistics
  (``aesam``);
* ``saf``: SAF and MESA, a trajectory loss instead of SAM's second pass (``saf``, ``mesa``);
* ``wsam``: WSAM, the sharpness weighted as a regulariser, outside the base optimiser (``wsam``);
* ``bsam``: bSAM, SAM as a relaxation of Bayes, with a Gaussian posterior over the weights (``bsam``).

The convenience builders ``esam()`` and ``aesam()``, and ``WSAMDescent``, ``BSAM`` and the posterior's
functions, are imported from their modules (``from flatminima.variants.esam import esam``), so that
``flatminima.variants.esam`` stays the module.
"""

from flatminima.variants import bsam as bsam  # registers bsam
from flatminima.variants import wsam as wsam  # registers wsam
from flatminima.variants.aesam import AdaptivePolicy, PolicyStatistics, policy_statistics
from flatminima.variants.esam import SharpnessSensitiveSelection, StochasticWeightPerturbation
from flatminima.variants.escape import OrthogonalEscape, RandomSign, SingleExample
from flatminima.variants.friendly_sam import FriendlyAscent
from flatminima.variants.gsam import GSAMDescent
from flatminima.variants.looksam import LookSAMDescent
from flatminima.variants.momentum_sam import MomentumAscent
from flatminima.variants.nsam import AscentSample
from flatminima.variants.periodic import RandomCadence, periodic_sam, random_sam, uniform_draw
from flatminima.variants.rwsam import GibbsReweighting
from flatminima.variants.saf import EMATarget, PastOutputs

__all__ = [
    "AdaptivePolicy",
    "AscentSample",
    "EMATarget",
    "FriendlyAscent",
    "GSAMDescent",
    "GibbsReweighting",
    "LookSAMDescent",
    "MomentumAscent",
    "OrthogonalEscape",
    "PastOutputs",
    "PolicyStatistics",
    "RandomCadence",
    "RandomSign",
    "SharpnessSensitiveSelection",
    "SingleExample",
    "StochasticWeightPerturbation",
    "periodic_sam",
    "policy_statistics",
    "random_sam",
    "uniform_draw",
]
