"""IM-3D for Blender: prompt or image to a textured mesh, and refinement of selected objects.

The backend (torch, diffusers, gsplat) runs as its own process, spoken to over HTTP on 127.0.0.1;
this package uses only the standard library and bpy. bpy-free parts: client, jobs, backend_process.
"""

from __future__ import annotations


def _modules():
    from . import operators, preferences, properties, ui

    return properties, preferences, operators, ui


def register() -> None:
    import bpy

    properties, preferences, operators, ui = _modules()
    properties.register()
    for module in (preferences, operators, ui):
        for cls in module.classes:
            bpy.utils.register_class(cls)


def unregister() -> None:
    import bpy

    from . import runtime

    runtime.shutdown()
    properties, preferences, operators, ui = _modules()
    for module in (ui, operators, preferences):
        for cls in reversed(module.classes):
            bpy.utils.unregister_class(cls)
    properties.unregister()
