"""The names ``pft --help`` lists, known without loading the packages behind them.

The CLI's start-up imports no torch, numpy or OpenCV (``pft --help`` and ``pft --version`` run in
well under a second), so the option help cannot ask the registries for their names;
``tests/test_cli_startup.py`` checks that these tuples equal the built-in names of the registries
they mirror (:data:`pft.core.methods.BUILTIN_METHODS`, :data:`pft.simulations.experiment.PROFILES`
and ``DEFAULT_METHODS``, :data:`pft.core.data.datasets.BUILTIN_LAYOUTS`). Names registered from
outside the package (docs/extending.md) are not listed here: the commands accept them once they
load the registries.
"""

from __future__ import annotations

__all__ = ["DEFAULT_METHOD_NAMES", "LAYOUT_NAMES", "METHOD_NAMES", "PROFILE_NAMES"]

#: cohort profiles of ``pft simulate`` / ``pft ablate``
PROFILE_NAMES: tuple[str, ...] = ("biovid", "stressid", "bah", "affwild2")
#: methods of ``pft simulate --methods``
METHOD_NAMES: tuple[str, ...] = (
    "source_only",
    "pft",
    "oracle",
    "oracle_bias",
    "shot",
    "nrc",
    "tpds",
    "neutral_calibration",
    "neutral_norm",
    "neutral_norm_matched",
    "adabn",
    "sfda_it",
    "sfit",
    "dsfda",
)
#: what ``pft simulate`` runs without ``--methods``
DEFAULT_METHOD_NAMES: tuple[str, ...] = ("source_only", "pft", "oracle")
#: dataset layouts of ``pft data --layout``
LAYOUT_NAMES: tuple[str, ...] = ("synthetic", "generic", "biovid", "stressid", "bah", "affwild2")
