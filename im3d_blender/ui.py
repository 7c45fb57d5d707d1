"""The 'Generate 3D' tab of the 3D Viewport sidebar."""

from __future__ import annotations

import bpy

from . import runtime


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
        running = runtime.Jobs.active is not None

        col = layout.column(align=True)
        col.enabled = not running
        col.prop(state, "prompt", text="", icon="TEXT")
        col.prop(state, "negative_prompt", text="", icon="REMOVE")
        col.prop(state, "image_path", text="")
        row = col.row(align=True)
        row.prop(state, "seed")
        row.operator("im3d.randomize_seed", text="", icon="FILE_REFRESH")
        col.prop(state, "preset", expand=True)
        col.prop(state, "use_custom_settings")
        if state.use_custom_settings:
            col.prop(state, "refinement_rounds")
            col.prop(state, "face_budget")
            col.prop(state, "texture_size")

        row = layout.row(align=True)
        row.scale_y = 1.4
        row.enabled = not running
        row.operator("im3d.generate", icon="SHADERFX")

        box = layout.box()
        box.enabled = not running
        box.label(text="Refine Selected", icon="MOD_REMESH")
        box.prop(state, "refine_use_diffusion")
        sub = box.column()
        sub.enabled = state.refine_use_diffusion
        sub.prop(state, "refine_strength")
        box.prop(state, "keep_original")
        row = box.row(align=True)
        row.prop(state, "turntable_views")
        row.prop(state, "turntable_size")
        box.operator("im3d.refine_selected", icon="FILE_REFRESH")

        if running or state.job_state:
            box = layout.box()
            if running:
                text = state.job_stage or state.job_state
                if state.job_eta:
                    text += f"  ETA {state.job_eta}"
                box.progress(factor=state.job_progress, type="BAR", text=text)
                if state.job_message:
                    box.label(text=state.job_message)
                box.operator("im3d.cancel", icon="CANCEL")
            elif state.job_error:
                for index, line in enumerate(_wrap(state.job_error, 48)):
                    box.label(text=line, icon="ERROR" if index == 0 else "BLANK1")
            else:
                box.label(text=f"{state.job_state}: {state.job_message}", icon="CHECKMARK" if state.job_state == "succeeded" else "INFO")
            if state.preview_image is not None:
                box.template_ID_preview(state, "preview_image", hide_buttons=True)

        layout.label(text="History", icon="TIME")
        layout.template_list("IM3D_UL_history", "", context.scene, "im3d_history", context.scene, "im3d_history_index", rows=3)
        layout.operator("im3d.reimport", icon="IMPORT")


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


classes = (IM3D_UL_history, IM3D_PT_generate)
