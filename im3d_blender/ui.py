"""The 'Generate 3D' tab of the 3D Viewport sidebar."""

from __future__ import annotations

import bpy

from . import local_backend, runtime
from .preferences import draw_wrapped


def _wrapped(layout, text: str, icon: str = "NONE") -> None:
    draw_wrapped(layout, text, icon, width=42)  # the sidebar is narrower than the preferences


class IM3D_UL_history(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_property, index=0):
        layout.label(text=item.name or item.prompt or item.job_id, icon="MESH_MONKEY" if item.kind == "refine" else "MESH_DATA")
        layout.label(text=item.preset)


class IM3D_PT_generate(bpy.types.Panel):
    bl_label = "Generate 3D"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Generate 3D"

    def draw(self, context):
        layout = self.layout
        state = context.scene.im3d
        busy = runtime.busy_reason()

        col = layout.column()
        col.enabled = not busy
        col.label(text="Prompt")
        col.prop(state, "prompt", text="", icon="TEXT", placeholder="e.g. a wooden rocking chair")
        col.prop(state, "negative_prompt", text="", icon="REMOVE", placeholder="Negative: what to avoid (optional)")
        col.prop(state, "image_path", text="Image")
        row = col.row(align=True)
        row.prop(state, "seed")
        row.operator("im3d.randomize_seed", text="", icon="FILE_REFRESH")
        col.prop(state, "preset", expand=True)
        values = local_backend.preset_values(state.preset)
        if values:
            summary = _preset_summary(values)
            if summary:
                col.label(text=summary, icon="INFO")
        col.prop(state, "use_lpips")
        if state.use_lpips and local_backend.Backend.lpips_missing:
            warn = col.box()
            _wrapped(warn, "The LPIPS backbone is not downloaded: get it in Preferences → IM-3D → Models, or untick Perceptual Loss.", "ERROR")
        col.prop(state, "use_custom_settings")
        if state.use_custom_settings:
            col.prop(state, "refinement_rounds")
            col.prop(state, "face_budget")
            col.prop(state, "texture_size")

        row = layout.row(align=True)
        row.scale_y = 1.4
        row.operator("im3d.generate", icon="SHADERFX")

        box = layout.box()
        box.label(text="Refine Selected", icon="MOD_REMESH")
        settings = box.column()
        settings.enabled = not busy
        settings.prop(state, "refine_use_diffusion")
        sub = settings.column()
        sub.enabled = state.refine_use_diffusion
        sub.prop(state, "refine_strength")
        settings.prop(state, "keep_original")
        grid = settings.grid_flow(columns=2, align=True)
        grid.prop(state, "turntable_views")
        grid.prop(state, "turntable_size")
        grid.prop(state, "turntable_elevation")
        grid.prop(state, "turntable_samples")
        count = len([o for o in context.selected_objects if o.type in ("MESH", "CURVE", "SURFACE", "META", "FONT")])
        if count > 1:
            box.label(text=f"Refines {count} selected objects, one after another", icon="INFO")
        elif count == 0 and not busy:
            box.label(text="Select one or more mesh objects", icon="INFO")
        box.operator("im3d.refine_selected", icon="FILE_REFRESH")

        if busy:
            layout.label(text=busy, icon="LOCKED")  # why the buttons are greyed out
        if runtime.Jobs.active is not None or state.job_state:
            box = layout.box()
            if runtime.Jobs.active is not None:
                text = state.job_stage or "Working"
                if state.job_eta:
                    text += f"  ·  {state.job_eta}"
                box.progress(factor=state.job_progress, type="BAR", text=text)
                if state.job_message:
                    box.label(text=state.job_message)
                box.operator("im3d.cancel", icon="CANCEL")
            elif state.job_error:
                _wrapped(box, state.job_error, "ERROR")
            elif state.job_message:
                _wrapped(box, state.job_message, "CHECKMARK" if state.job_state == "succeeded" else "INFO")
            if state.preview_image is not None:
                box.template_ID_preview(state, "preview_image", hide_buttons=True)

        layout.label(text="History", icon="TIME")
        layout.template_list("IM3D_UL_history", "", context.scene, "im3d_history", context.scene, "im3d_history_index", rows=3)
        layout.operator("im3d.reimport", icon="IMPORT")


def _preset_summary(values: dict) -> str:
    parts = []
    rounds = values.get("pipeline", {}).get("refinement_rounds")
    steps = values.get("recon", {}).get("steps")
    faces = values.get("mesh", {}).get("face_budget")
    texture = values.get("mesh", {}).get("texture_size")
    if steps is not None:
        parts.append(f"{steps} steps")
    if rounds is not None:
        parts.append(f"{rounds} rounds")
    if faces is not None:
        parts.append(f"{faces:,} faces" if isinstance(faces, int) else f"{faces} faces")
    if texture is not None:
        parts.append(f"{texture} px")
    return ", ".join(parts)


classes = (IM3D_UL_history, IM3D_PT_generate)
