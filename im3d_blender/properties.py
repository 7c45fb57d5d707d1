"""Scene properties: what the artist types in the sidebar, the running job's display, the history."""

from __future__ import annotations

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

PRESET_ITEMS = [
    ("FAST", "Fast", "Fewer steps and a smaller texture: a first look in a fraction of the time"),
    ("STANDARD", "Standard", "The paper's settings"),
    ("HIGH", "High", "More steps, more faces and a larger texture"),
]


class IM3D_HistoryItem(bpy.types.PropertyGroup):
    job_id: StringProperty(name="Job")
    kind: StringProperty(name="Kind")
    name: StringProperty(name="Object")
    prompt: StringProperty(name="Prompt")
    seed: IntProperty(name="Seed")
    preset: StringProperty(name="Preset")
    folder: StringProperty(name="Folder", subtype="DIR_PATH")
    source_object: StringProperty(name="Refined object")


class IM3D_SceneSettings(bpy.types.PropertyGroup):
    prompt: StringProperty(name="Prompt", description="What to make, e.g. 'a wooden rocking chair'")
    negative_prompt: StringProperty(name="Negative", description="What to avoid")
    image_path: StringProperty(name="Image", description="Optional reference image (PNG or JPEG); replaces or guides the prompt", subtype="FILE_PATH")
    seed: IntProperty(name="Seed", default=0, min=0, max=2**31 - 1)
    preset: EnumProperty(name="Preset", items=PRESET_ITEMS, default="STANDARD")
    use_custom_settings: BoolProperty(name="Custom Settings", description="Override the preset's rounds, faces and texture size")
    refinement_rounds: IntProperty(name="Refinement Rounds", default=2, min=0, max=5)
    face_budget: IntProperty(name="Face Budget", default=50_000, min=500, max=2_000_000)
    texture_size: EnumProperty(
        name="Texture Size", items=[(str(s), f"{s} px", "") for s in (512, 1024, 2048)], default="1024"
    )
    refine_strength: FloatProperty(name="Strength", description="How much the refinement may change the object", default=0.5, min=0.05, max=1.0)
    refine_use_diffusion: BoolProperty(name="Use Diffusion", description="Re-imagine details with the diffusion model; off: rebuild from the renders only", default=True)
    keep_original: BoolProperty(name="Keep Original Visible", default=True)
    turntable_views: IntProperty(name="Views", default=16, min=4, max=64)
    turntable_size: IntProperty(name="Render Size", default=256, min=64, max=1024)
    turntable_elevation: FloatProperty(name="Elevation", default=10.0, min=-60.0, max=80.0, subtype="NONE")
    turntable_samples: IntProperty(name="Samples", default=16, min=1, max=512)
    advanced_overrides: StringProperty(name="Overrides", description='JSON config overrides for experts, e.g. {"recon": {"steps": 300}}')

    # the running (or last) job, for display
    job_id: StringProperty()
    job_state: StringProperty()
    job_stage: StringProperty()
    job_message: StringProperty()
    job_error: StringProperty()
    job_eta: StringProperty()
    job_progress: FloatProperty(min=0.0, max=1.0, subtype="FACTOR")
    preview_image: PointerProperty(type=bpy.types.Image)


classes = (IM3D_HistoryItem, IM3D_SceneSettings)


def register() -> None:
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.Scene.im3d = PointerProperty(type=IM3D_SceneSettings)
    bpy.types.Scene.im3d_history = CollectionProperty(type=IM3D_HistoryItem)
    bpy.types.Scene.im3d_history_index = IntProperty(default=-1)


def unregister() -> None:
    del bpy.types.Scene.im3d_history_index
    del bpy.types.Scene.im3d_history
    del bpy.types.Scene.im3d
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
