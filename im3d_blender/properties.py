"""Scene properties: what the artist types in the sidebar, the running job's display, the history."""

from __future__ import annotations

import math

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    FloatVectorProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

PRESET_ITEMS = [
    ("FAST", "Fast", "Fewer fitting steps and a smaller texture: a first look in a fraction of the time"),
    ("STANDARD", "Standard", "The settings of the IM-3D paper"),
    ("HIGH", "High", "More fitting steps, more faces and a larger texture: slower"),
]


def _fill_from_preset(self, context) -> None:
    """Ticking Custom Settings starts from the backend's values for the chosen preset (when it told us)."""
    if not self.use_custom_settings:
        return
    from .local_backend import preset_values

    values = preset_values(self.preset)
    if not values:
        return
    rounds = values.get("pipeline", {}).get("refinement_rounds")
    faces = values.get("mesh", {}).get("face_budget")
    texture = values.get("mesh", {}).get("texture_size")
    if isinstance(rounds, int):
        self.refinement_rounds = max(0, min(5, rounds))
    if isinstance(faces, int):
        self.face_budget = max(500, min(2_000_000, faces))
    if str(texture) in ("512", "1024", "2048"):
        self.texture_size = str(texture)


class IM3D_HistoryItem(bpy.types.PropertyGroup):
    job_id: StringProperty(name="Job", description="The backend job that made this result (its folder name on the backend)")
    kind: StringProperty(name="Kind", description="How it was made: generate (from a prompt or image) or refine (from a selected object)")
    name: StringProperty(name="Object", description="The full name the object had when it was imported")
    prompt: StringProperty(name="Prompt", description="The prompt the job was run with")
    seed: IntProperty(name="Seed", description="The random seed the job was run with (the same seed and settings give the same object)")
    preset: StringProperty(name="Preset", description="The quality preset the job was run with")
    folder: StringProperty(name="Folder", subtype="DIR_PATH", description="Where the verified result files are kept on this computer")
    source_object: StringProperty(name="Refined Object", description="The object this result is a refined copy of (empty for Generate)")
    frame: FloatVectorProperty(
        name="Data Frame", size=16, description="World matrix the mesh data is expressed in (the refined original's, at render time), row by row",
    )
    matrix: FloatVectorProperty(name="World Matrix", size=16, description="The object's world matrix when it was imported, row by row (re-import puts it back there)")
    width: FloatProperty(name="Width", description="Width along X used to place a re-imported copy beside the first one", default=1.0, min=0.0, subtype="DISTANCE", unit="LENGTH")


class IM3D_SceneSettings(bpy.types.PropertyGroup):
    prompt: StringProperty(name="Prompt", description="What to make, in words, e.g. 'a wooden rocking chair' (Refine: what the selected object is)")
    negative_prompt: StringProperty(name="Negative Prompt", description="What to keep out of the result, e.g. 'blurry, text'")
    image_path: StringProperty(name="Image", description="Optional reference image (PNG or JPEG) to make the object from, instead of or with the prompt", subtype="FILE_PATH")
    seed: IntProperty(name="Seed", description="Random seed: the same seed, prompt and settings give the same object", default=0, min=0, max=2**31 - 1)
    preset: EnumProperty(name="Preset", description="Quality and speed of the job (the backend's presets)", items=PRESET_ITEMS, default="STANDARD", update=_fill_from_preset)
    use_custom_settings: BoolProperty(
        name="Custom Settings", description="Change the preset's refinement rounds, face budget and texture size", update=_fill_from_preset,
    )
    refinement_rounds: IntProperty(
        name="Refinement Rounds", description="How many times the views are re-rendered, re-diffused and re-fitted (the paper: 2-3)", default=2, min=0, max=5,
    )
    face_budget: IntProperty(name="Face Budget", description="Most faces the final mesh may have (it is decimated to fit)", default=50_000, min=500, max=2_000_000)
    texture_size: EnumProperty(
        name="Texture Size", description="Width and height of the baked colour texture, in pixels",
        items=[(str(s), f"{s} px", f"A {s} × {s} pixel texture") for s in (512, 1024, 2048)], default="1024",
    )
    use_lpips: BoolProperty(
        name="Perceptual Loss (LPIPS)",
        description="Fit with the LPIPS perceptual loss, as in the paper (needs the LPIPS backbone, from Preferences → Models); "
        "off: fit with MS-SSIM and the mask only, a little less detail, no download",
        default=True,
    )
    refine_strength: FloatProperty(
        name="Strength", description="How much the diffusion model may change the object (0: keep it, 1: re-imagine it)",
        default=0.5, min=0.05, max=1.0, subtype="FACTOR",
    )
    refine_use_diffusion: BoolProperty(
        name="Use Diffusion", description="Re-imagine details with the diffusion model (needs its weights); off: rebuild from the renders only", default=True,
    )
    keep_original: BoolProperty(name="Keep Original Visible", description="Leave the original visible beside its refined copy; off: hide it in the viewport and the render", default=True)
    turntable_views: IntProperty(name="Views", description="How many turntable renders of the object are made (evenly spaced around it)", default=16, min=4, max=64)
    turntable_size: IntProperty(name="Render Size", description="Width and height of each turntable render", default=256, min=64, max=1024, subtype="PIXEL")
    turntable_elevation: FloatProperty(
        name="Elevation", description="Height of the turntable cameras above the object's centre, as an angle", default=math.radians(10.0),
        min=math.radians(-60.0), max=math.radians(80.0), subtype="ANGLE", unit="ROTATION",
    )
    turntable_samples: IntProperty(name="Samples", description="Render samples per pixel of each turntable view (more: less noise, slower)", default=16, min=1, max=512)
    advanced_overrides: StringProperty(name="Overrides", description='JSON config overrides for experts, e.g. {"recon": {"steps": 300}}')

    # the running (or last) job, for display
    job_id: StringProperty(name="Job", description="The backend job of the running or last job")
    job_state: StringProperty(name="State", description="running, succeeded, failed or cancelled")
    job_stage: StringProperty(name="Stage", description="What the running job is doing now")
    job_message: StringProperty(name="Message", description="What the last job did")
    job_error: StringProperty(name="Error", description="Why the last job failed, and what to do")
    job_eta: StringProperty(name="Time Left", description="Estimated time until the job is done, from measured speeds")
    job_progress: FloatProperty(name="Progress", description="How much of the whole job is done", min=0.0, max=1.0, subtype="FACTOR")
    preview_image: PointerProperty(name="Preview", description="The latest preview render of the running job", type=bpy.types.Image)


classes = (IM3D_HistoryItem, IM3D_SceneSettings)


def register() -> None:
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.Scene.im3d = PointerProperty(name="IM-3D", description="IM-3D settings of this scene", type=IM3D_SceneSettings)
    bpy.types.Scene.im3d_history = CollectionProperty(name="IM-3D History", description="Results of the IM-3D jobs run in this scene", type=IM3D_HistoryItem)
    bpy.types.Scene.im3d_history_index = IntProperty(name="History Index", description="The history entry Re-import uses", default=-1)


def unregister() -> None:
    del bpy.types.Scene.im3d_history_index
    del bpy.types.Scene.im3d_history
    del bpy.types.Scene.im3d
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
