"""``backend="eager"``: the GraphModules as they are."""

from __future__ import annotations

from .registry import Backend, register_backend


def compile_eager(gm, name, on_compile, **options):
    if options:
        raise TypeError(f"the eager backend takes no options, got {sorted(options)}")
    return gm


BACKEND = register_backend(Backend("eager", "the FX graphs run as they are", compile_graph=compile_eager))
