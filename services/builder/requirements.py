"""The packages a program's code imports beyond what edgedistill serves with (`rapidfuzz` to
normalise an answer, `pandas` between two steps). The runtime and the router import that code,
so the serving images must hold them: program.json lists them pinned to the versions the build
ran with, the images install them, and a runtime without them says which at start."""

from __future__ import annotations

import sys
from functools import cache
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from services.builder.spec import module_of_file
from services.core.pipeline import imported_names

SERVED_WITH = "edgedistill"  # its own dependencies, not its extras, are in the serving images


def program_requirements(sources: dict[str, Path]) -> list[str]:
    """`dist==version` for each installed distribution the program's code imports that the
    serving images lack, sorted. Its own modules, the standard library and imports this
    environment cannot resolve (an optional one, behind `try`) are left out."""
    own = {Path(rel).parts[0].removesuffix(".py") for rel in sources}
    imported: set[str] = set()
    for rel, file in sources.items():
        if file.suffix == ".py":
            module = module_of_file(rel).removesuffix(".__init__")
            imported |= {name.partition(".")[0] for name in imported_names(file, module)}
    providers = metadata.packages_distributions()
    serving = serving_distributions()
    found: dict[str, str] = {}
    for name in sorted(imported - own - set(sys.stdlib_module_names)):
        for dist in providers.get(name, []):
            if canonicalize_name(dist) not in serving:
                found[canonicalize_name(dist)] = f"{dist}=={metadata.version(dist)}"
    return sorted(found.values())


@cache
def serving_distributions() -> frozenset[str]:
    """edgedistill and every distribution its (extra-free) requirements pull in, as installed
    here: what `pip install edgedistill` puts in a serving image."""
    seen: set[str] = set()
    pending = [SERVED_WITH]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            wanted = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        pending += [req.name for req in map(_requirement, wanted) if req is not None]
    return frozenset(seen)


def _requirement(text: str) -> Requirement | None:
    """The requirement, when it applies to an install without extras."""
    try:
        req = Requirement(text)
    except InvalidRequirement:
        return None
    return req if req.marker is None or req.marker.evaluate({"extra": ""}) else None
