"""Plug-ins: methods, cohort profiles and dataset layouts from other distributions (docs/extending.md).

Three registries take additions from outside the package, each through one call and through one
Python entry-point group:

============================  ===========================================  ==================
registry                      the call                                     entry-point group
============================  ===========================================  ==================
methods (``pft simulate``)    :func:`pft.core.methods.register_method`     ``pft.methods``
cohort profiles               :func:`pft.core.cohort.register_profile`     ``pft.profiles``
dataset layouts (``--data``)  :func:`pft.core.data.register_layout`        ``pft.layouts``
============================  ===========================================  ==================

An entry point's name is the name it registers; its object is what the call takes (a
:class:`pft.core.methods.MethodSpec` or a runner, a :class:`pft.core.cohort.ProfileSpec`, a loader).
Each group is read once per process, the first time its registry is asked for a name that is not
built in or for the whole list (validating an ``ExperimentConfig`` or a ``CohortConfig`` that names
one, a registered method's settings, ``--methods all``, a Flower node scoring a method), never at
``pft --help``; a run of built-in names only does not read them. A plug-in that fails to load
stops the command with a :class:`PluginError` naming it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

from pft.core.errors import PFTError

METHODS_GROUP = "pft.methods"
PROFILES_GROUP = "pft.profiles"
LAYOUTS_GROUP = "pft.layouts"
GROUPS: tuple[str, ...] = (METHODS_GROUP, PROFILES_GROUP, LAYOUTS_GROUP)

#: what a registered name may look like (it is a config key, a folder name and a CLI word)
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

_loaded: set[str] = set()


class PluginError(PFTError):
    """A plug-in could not be registered (bad name, name taken, broken entry point)."""


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid registry name (lower-case letters, digits, ``_``; a letter first)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise PluginError(
            f"{kind} name {name!r} must be lower-case letters, digits and '_', starting with a letter"
        )
    return name


def _origin(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    where = f" (distribution {dist.name} {dist.version})" if dist is not None else ""
    return f"entry point {ep.name} = {ep.value} of group {ep.group}{where}"


def load_entry_points(group: str, register: Callable[[str, object], None]) -> None:
    """Register every entry point of ``group`` through ``register(name, object)``, once per process.

    Entry points are taken in name order (the same on every machine). A second call does nothing;
    :func:`reload_entry_points` forgets that a group was read (after ``pip install`` in a notebook).
    """
    if group in _loaded:
        return
    _loaded.add(group)  # first: a plug-in that itself asks the registry does not recurse
    try:
        for ep in sorted(entry_points(group=group), key=lambda e: (e.name, e.value)):
            try:
                obj = ep.load()
            except Exception as exc:
                raise PluginError(f"{_origin(ep)} failed to load: {type(exc).__name__}: {exc}") from exc
            try:
                register(ep.name, obj)
            except PluginError as exc:
                raise PluginError(f"{_origin(ep)}: {exc}") from exc
    except BaseException:
        _loaded.discard(group)  # a fixed plug-in is read again on the next call
        raise


def reload_entry_points(group: str | None = None) -> None:
    """Read ``group`` (default: every group) again on its next use (plug-ins installed since)."""
    if group is None:
        _loaded.clear()
    else:
        _loaded.discard(group)
