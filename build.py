#!/usr/bin/env python3
"""Build the Blender extension zip and validate it with Blender's own extension validator.

    python build.py                  -> dist/im3d_blender-<version>.zip, validated
    python build.py --out DIR --blender /path/to/blender

The zip holds the add-on package at its root with `blender_manifest.toml` beside `__init__.py`,
and the backend source the add-on sets its environment up from (`backend/im3d`,
`backend/pyproject.toml`, `backend/uv.lock` and every file the pyproject names, e.g. its README:
the set-up builds the `im3d` wheel from these, and hatchling refuses to build without them). Validation runs `blender --command extension
validate` when a Blender executable is given or on PATH; otherwise the same validator script
shipped inside the `bpy` module (`addons_core/bl_pkg/cli/blender_ext.py validate`).
Standard library only.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON = ROOT / "im3d_blender"
MANIFEST = ROOT / "blender_manifest.toml"
BACKEND_FILES = ("pyproject.toml", "uv.lock", "LICENSE")
SKIP_PARTS = {"__pycache__", ".venv", ".pytest_cache", ".mypy_cache"}
SKIP_SUFFIXES = {".pyc", ".pyo", ".so", ".pyd"}


class BuildError(RuntimeError):
    pass


def manifest_version(path: Path = MANIFEST) -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', path.read_text(encoding="utf-8"), re.M)
    if match is None:
        raise BuildError(f"{path} has no version = \"...\" line")
    return match.group(1)


def backend_files(backend: Path = ROOT / "backend") -> list[str]:
    """The backend's top-level files the build needs: pyproject, lock, licence, and the readme the pyproject names."""
    import tomllib

    names = list(BACKEND_FILES)
    project = tomllib.loads((backend / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    readme = project.get("readme")
    readme = readme.get("file") if isinstance(readme, dict) else readme
    if readme and readme not in names:
        names.append(readme)
    return [name for name in names if name != "LICENSE" or (backend / name).exists()]


def _files(folder: Path):
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not path.is_symlink() and not SKIP_PARTS.intersection(relative.parts) and path.suffix not in SKIP_SUFFIXES:
            yield path, relative.as_posix()


def build_zip(out_dir: Path) -> Path:
    """Write the extension zip (deterministic order and timestamps) and return its path."""
    if not (ROOT / "backend" / "pyproject.toml").exists():
        raise BuildError(f"{ROOT / 'backend' / 'pyproject.toml'} is missing; run build.py from a complete checkout")
    extra = backend_files()
    for needed in (MANIFEST, ADDON / "__init__.py", ROOT / "backend" / "im3d", *(ROOT / "backend" / f for f in extra)):
        if not needed.exists():
            raise BuildError(f"{needed} is missing; run build.py from a complete checkout")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"im3d_blender-{manifest_version()}.zip"
    temporary = target.with_suffix(".zip.part")
    entries: list[tuple[Path, str]] = [(MANIFEST, "blender_manifest.toml")]
    entries += [(path, name) for path, name in _files(ADDON) if not name.startswith("backend/")]
    entries += [(path, f"backend/im3d/{name}") for path, name in _files(ROOT / "backend" / "im3d")]
    entries += [(ROOT / "backend" / name, f"backend/{name}") for name in extra]
    with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, name in entries:
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())
    temporary.replace(target)
    return target


def validator_script() -> Path | None:
    """blender_ext.py inside the installed bpy module, found without importing bpy."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for candidate in Path(location).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"):
            return candidate
    return None


def validate(zip_path: Path, blender: str | None = None) -> str:
    """Run Blender's extension validator on the zip; returns its output, raises BuildError when it fails."""
    blender = blender or shutil.which("blender")
    if blender:
        command = [blender, "--factory-startup", "--command", "extension", "validate", str(zip_path)]
    else:
        script = validator_script()
        if script is None:
            raise BuildError("no Blender to validate with: pass --blender PATH, put blender on PATH, or install the bpy module")
        command = [sys.executable, str(script), "validate", str(zip_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or re.search(r"^(error|fatal)", output, re.I | re.M):
        raise BuildError(f"the extension does not validate:\n{output}")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    parser.add_argument("--blender", help="Blender executable for validation (default: on PATH, else the bpy module's validator)")
    parser.add_argument("--no-validate", action="store_true", help="only build the zip")
    args = parser.parse_args(argv)
    try:
        zip_path = build_zip(args.out)
        print(f"built {zip_path} ({zip_path.stat().st_size / 1e6:.2f} MB)")
        if not args.no_validate:
            print(validate(zip_path, args.blender) or "valid")
    except BuildError as error:
        print(f"build.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
