"""IM-3D for Blender: prompt or image to a textured mesh, and refinement of selected objects.

The backend (torch, diffusers, gsplat) runs as its own process, spoken to over HTTP on 127.0.0.1;
this package uses only the standard library and bpy. bpy-free modules: client, jobs,
backend_process, setup_env, progress. See docs/addon.md for the module map.
"""

from __future__ import annotations


def _modules():
    from . import operators, preferences, properties, ui

    modules = [preferences, operators, ui]
    models_ui = preferences.models_ui()  # Preferences → Models, when this version has it
    if models_ui is not None and hasattr(models_ui, "classes"):
        modules.append(models_ui)
    return properties, modules


def register() -> None:
    import bpy

    properties, modules = _modules()
    properties.register()
    for module in modules:
        for cls in module.classes:
            bpy.utils.register_class(cls)


def unregister() -> None:
    import bpy

    from . import runtime

    runtime.shutdown()
    properties, modules = _modules()
    for module in reversed(modules):
        for cls in reversed(module.classes):
            bpy.utils.unregister_class(cls)
    properties.unregister()
