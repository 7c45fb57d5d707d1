"""The backend's Python environment: made with uv, exactly from the lock bundled in the extension zip.

Standard library only, no bpy: the preferences run it in a thread, tests and scripts call it directly.
`setup_environment` checks what it needs first (a complete bundled source, a writable folder, uv or
pip to get uv), tells the download size before it starts, reports progress, honours cancel, checks
`import im3d` and torch's device at the end, and removes the environment it was making when any of
that fails, so a later start says "press Set up Backend" instead of "No module named 'im3d'".
"""

from __future__ import annotations

import json
import os
import platform
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Callable

from .client import BackendError

LogFn = Callable[[str], None]
ProgressFn = Callable[[float, str], None]  # (fraction 0..1, what is happening)
IS_WINDOWS = os.name == "nt"
MARKER = ".im3d-setup.json"  # written last into a finished environment
PYTHON_VERSION = "3.11"

# What uv prints when it cannot reach the package index (PyPI or a mirror).
NETWORK_PATTERNS = re.compile(
    r"(network connectivity is disabled|failed to fetch|error sending request|dns error|failed to lookup address|"
    r"connection refused|connection reset|timed out|could not connect|tcp connect error|no such host|"
    r"name or service not known|temporary failure in name resolution)",
    re.I,
)


def env_python(env_dir: str | os.PathLike) -> Path:
    return Path(env_dir) / ("Scripts/python.exe" if IS_WINDOWS else "bin/python")


def environment_ready(env_dir: str | os.PathLike) -> bool:
    """True when `env_dir` holds an environment a set-up finished (not a half-made one)."""
    return env_python(env_dir).exists() and (Path(env_dir) / MARKER).is_file()


# ----------------------------------------------------------------------------------------------
# How much will be downloaded (from the lock, before anything is fetched)


def _version_tuple(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.*]", text) if p != "")


def marker_environment(python: tuple[int, int, int] | None = None) -> dict[str, str]:
    info = python or tuple(sys.version_info[:3])
    if (info[0], info[1]) != tuple(int(p) for p in PYTHON_VERSION.split(".")):
        info = (*(int(p) for p in PYTHON_VERSION.split(".")), 0)  # the environment is made with PYTHON_VERSION
    return {
        "python_version": f"{info[0]}.{info[1]}",
        "python_full_version": f"{info[0]}.{info[1]}.{info[2]}",
        "sys_platform": sys.platform,
        "platform_machine": platform.machine(),
        "platform_system": platform.system(),
        "os_name": os.name,
        "implementation_name": sys.implementation.name,
        "platform_python_implementation": platform.python_implementation(),
        "extra": "",
    }


_ATOM = re.compile(r"""(\w+)\s*(==|!=|<=|>=|<|>|~=|not in|in)\s*['"]([^'"]*)['"]""")


def marker_matches(marker: str | None, env: dict[str, str]) -> bool:
    """Evaluate a PEP 508 marker as written in uv.lock (atoms joined by and/or and parentheses)."""
    if not marker:
        return True

    def atom(match: re.Match) -> str:
        name, op, value = match.groups()
        have = env.get(name, "")
        if name.endswith("version"):
            left, right = _version_tuple(have), _version_tuple(value)
            if value.endswith(".*"):  # '3.11.*'
                left = left[: len(right)]
            result = {
                "==": left == right, "!=": left != right, "<": left < right, "<=": left <= right,
                ">": left > right, ">=": left >= right, "~=": left >= right,
            }.get(op, False)
        else:
            result = {"==": have == value, "!=": have != value, "in": have in value, "not in": have not in value}.get(op, False)
        return " True " if result else " False "

    expression = _ATOM.sub(atom, marker)
    if re.fullmatch(r"[\sTrueFalsandor()]*", expression) is None:
        return True  # a marker we cannot read: count the package rather than hide its size
    return bool(eval(expression, {"__builtins__": {}}, {}))  # only True/False/and/or/() remain


def _wheel_fits(filename: str, env: dict[str, str]) -> bool:
    tags = filename[:-4].split("-")[-3:]  # python tag, abi tag, platform tag
    py, abi, plat = tags if len(tags) == 3 else ("", "", "")
    cp = "cp" + env["python_version"].replace(".", "")
    if not any(p in ("py3", "py2", cp) or (abi == "abi3" and p.startswith("cp3") and int(p[3:] or 0) <= int(cp[3:])) for p in py.split(".")):
        return False
    if plat == "any":
        return True
    machine = env["platform_machine"].lower()
    machines = {"amd64": ("x86_64", "amd64"), "x86_64": ("x86_64", "amd64"), "arm64": ("arm64", "aarch64"), "aarch64": ("aarch64", "arm64")}.get(machine, (machine,))
    system = {"linux": ("linux",), "darwin": ("macosx",), "win32": ("win",)}.get(env["sys_platform"], (env["sys_platform"],))
    return any(s in plat for s in system) and (any(m in plat for m in machines) or "universal2" in plat)


def download_size(lock_path: str | os.PathLike, root: str = "im3d", python: tuple[int, int, int] | None = None) -> tuple[int, int]:
    """(bytes, packages) this platform downloads to install `root` from the lock, dev tools excluded."""
    import tomllib

    env = marker_environment(python)
    with open(lock_path, "rb") as file:
        lock = tomllib.load(file)
    by_name: dict[str, list[dict]] = {}
    for package in lock.get("package", []):
        by_name.setdefault(package["name"], []).append(package)

    def find(name: str, version: str | None) -> dict | None:
        candidates = by_name.get(name, [])
        for package in candidates:
            if version is None or package.get("version") == version:
                return package
        return candidates[0] if candidates else None

    total, seen, stack = 0, set(), [find(root, None)]
    while stack:
        package = stack.pop()
        if package is None or (package["name"], package.get("version")) in seen:
            continue
        seen.add((package["name"], package.get("version")))
        if package["name"] != root:
            wheels = [w for w in package.get("wheels", []) if _wheel_fits(w["url"].rsplit("/", 1)[-1], env)]
            if wheels:
                total += int(wheels[0].get("size") or 0)
            elif package.get("sdist"):
                total += int(package["sdist"].get("size") or 0)
        for dependency in package.get("dependencies", []):
            if marker_matches(dependency.get("marker"), env):
                target = find(dependency["name"], dependency.get("version"))
                stack.append(target)
                for extra in dependency.get("extra", []) if target is not None else []:  # e.g. cuda-toolkit[cublas]
                    for optional in target.get("optional-dependencies", {}).get(extra, []):
                        if marker_matches(optional.get("marker"), env):
                            stack.append(find(optional["name"], optional.get("version")))
    return total, len(seen) - 1


def format_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


# ----------------------------------------------------------------------------------------------
# Checks before anything is changed


def find_uv(tools_dir: str | os.PathLike | None = None) -> str | None:
    found = shutil.which("uv")
    if found:
        return found
    if tools_dir is not None and Path(tools_dir).is_dir():
        for candidate in Path(tools_dir).glob("**/uv.exe" if IS_WINDOWS else "**/bin/uv"):
            if candidate.is_file():
                return str(candidate)
    return None


def check_source(source_dir: Path) -> None:
    needed = ["pyproject.toml", "uv.lock", "im3d/__init__.py"]
    try:
        import tomllib

        project = tomllib.loads((source_dir / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
        readme = project.get("readme")
        if isinstance(readme, str):
            needed.append(readme)  # hatchling refuses to build without the file the pyproject names
    except (OSError, ValueError):
        pass
    for name in needed:
        if not (source_dir / name).exists():
            raise BackendError("setup_failed", f"the bundled backend is incomplete: {source_dir / name} is missing; reinstall the extension (a newer zip has it)")


def check_writable(env_dir: Path) -> None:
    """The environment's folder must be creatable and writable, and must not hold anything else."""
    if env_dir.exists() and not env_dir.is_dir():
        raise BackendError("setup_folder", f"{env_dir} is a file, not a folder; choose another Environment folder in the preferences")
    if env_dir.is_dir() and any(env_dir.iterdir()) and not (env_dir / "pyvenv.cfg").exists():
        raise BackendError(
            "setup_folder", f"{env_dir} is not empty and is not a Python environment; choose an empty or new Environment folder in the preferences"
        )
    probe_dir = env_dir if env_dir.is_dir() else next((p for p in env_dir.parents if p.is_dir()), None)
    if probe_dir is None or not os.access(probe_dir, os.W_OK | os.X_OK):
        raise BackendError("setup_folder", f"cannot write to {probe_dir or env_dir}; choose an Environment folder you can write to in the preferences")
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".im3d-write-test-"):
            pass
    except OSError as error:
        raise BackendError("setup_folder", f"cannot write to {probe_dir} ({error.strerror}); choose an Environment folder you can write to in the preferences") from None


# ----------------------------------------------------------------------------------------------
# The set-up


def setup_environment(
    source_dir: str | os.PathLike,
    env_dir: str | os.PathLike,
    tools_dir: str | os.PathLike,
    log: LogFn,
    cancel: Callable[[], bool] = lambda: False,
    progress: ProgressFn = lambda fraction, text: None,
    python_version: str = PYTHON_VERSION,
    pip_python: str | None = None,
    extra_env: dict | None = None,
) -> Path:
    """Create the backend's environment from `source_dir/uv.lock` in `env_dir`; returns its Python.

    Every output line goes to `log`; a failure raises `BackendError` whose message says what to do,
    and leaves no half-made environment behind. `pip_python` is the Python whose pip installs uv
    when uv is missing (default: the running one, i.e. Blender's).
    """
    source_dir, env_dir, tools_dir = Path(source_dir), Path(env_dir), Path(tools_dir)
    check_source(source_dir)
    check_writable(env_dir)
    try:
        size, count = download_size(source_dir / "uv.lock")
        log(f"the backend needs {count} packages, about {format_size(size)} to download (less if uv has them cached)")
    except (OSError, ValueError, KeyError, ImportError) as error:
        log(f"cannot estimate the download size from the lock ({error})")
        count = 0
    created = not env_dir.exists()
    env = dict(os.environ, **(extra_env or {}))
    env["UV_PROJECT_ENVIRONMENT"] = str(env_dir)
    try:
        progress(0.0, "finding uv")
        uv = find_uv(tools_dir)
        if uv is None:
            uv = _install_uv(tools_dir, log, cancel, pip_python or sys.executable)
        (env_dir / MARKER).unlink(missing_ok=True)
        progress(0.05, "downloading and installing packages")
        downloaded = [0]

        def on_line(line: str) -> None:
            if re.match(r"\s*(Downloaded|Built)\b", line):
                downloaded[0] += 1
                if count:
                    progress(0.05 + 0.8 * min(1.0, downloaded[0] / count), line.strip())
            elif re.match(r"\s*Installed \d+ packages", line):
                progress(0.85, "compiling Python bytecode (once, so that every backend start is quicker)")

        # Compiled once here, not by the first job (about 4 s of every start where .pyc files cannot be written).
        command = [uv, "sync", "--project", str(source_dir), "--frozen", "--no-dev", "--compile-bytecode", "--python", python_version]
        _run_logged(command, log, cancel, env=env, on_line=on_line, failure=_sync_failure)
        python = env_python(env_dir)
        if not python.exists():
            raise BackendError("setup_failed", f"uv finished but {python} does not exist; press Set up Backend again")
        progress(0.9, "checking the environment (import im3d, torch device)")
        report = verify_environment(python, cancel)
        log(f"im3d {report['im3d']} with torch {report['torch']} on {report['device']}")
        (env_dir / MARKER).write_text(json.dumps({"source": str(source_dir), **report}), encoding="utf-8")
        progress(1.0, f"ready: torch {report['torch']} on {report['device']}")
    except BaseException:
        # Leave nothing half-made: a later start must say "press Set up Backend", not "No module named 'im3d'".
        if created or (env_dir / "pyvenv.cfg").exists():
            shutil.rmtree(env_dir, ignore_errors=True)
            log(f"removed the unfinished environment {env_dir}")
        raise
    log(f"backend environment ready: {python}")
    return python


CHECK_SCRIPT = """
import json, im3d, torch
if torch.cuda.is_available():
    device = "cuda (" + torch.cuda.get_device_name(0) + ")"
elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
    device = "mps (Apple GPU)"
else:
    device = "cpu"
print("IM3D-CHECK " + json.dumps({"im3d": im3d.__version__, "torch": torch.__version__, "device": device}))
"""


def verify_environment(python: str | os.PathLike, cancel: Callable[[], bool] = lambda: False, timeout: float = 300.0) -> dict:
    """Run the environment's Python: `import im3d` and torch, and which device torch sees."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # not Blender's paths
    try:
        result = subprocess.run([str(python), "-c", CHECK_SCRIPT], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise BackendError("setup_failed", f"importing im3d and torch took more than {timeout:.0f} s; press Set up Backend again") from None
    except OSError as error:
        raise BackendError("setup_failed", f"cannot run {python}: {error.strerror}; press Set up Backend again") from None
    for line in result.stdout.splitlines():
        if line.startswith("IM3D-CHECK "):
            return json.loads(line[len("IM3D-CHECK "):])
    last = (result.stderr.strip().splitlines() or ["no output"])[-1]
    raise BackendError("setup_failed", f"the new environment cannot import the backend ({last}); press Set up Backend again")


def _install_uv(tools_dir: Path, log: LogFn, cancel, pip_python: str) -> str:
    log(f"uv is not on PATH: installing it into {tools_dir} with {pip_python}'s pip")
    has_pip = subprocess.run([pip_python, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if not has_pip:
        raise BackendError(
            "setup_no_uv", "uv is not installed and this Python has no pip to install it; install uv (https://docs.astral.sh/uv/) "
            "so that it is on PATH, then press Set up Backend again",
        )
    tools_dir.mkdir(parents=True, exist_ok=True)
    _run_logged(
        [pip_python, "-m", "pip", "install", "--disable-pip-version-check", "--target", str(tools_dir), "uv"], log, cancel,
        failure=lambda code, lines: BackendError(
            "setup_no_network" if any(NETWORK_PATTERNS.search(l) for l in lines) else "setup_no_uv",
            "pip could not install uv (" + " | ".join(lines[-2:]) + "); connect to the internet or install uv yourself "
            "(https://docs.astral.sh/uv/), then press Set up Backend again",
        ),
    )
    uv = find_uv(tools_dir)
    if uv is None:
        raise BackendError("setup_no_uv", "pip installed uv but its executable was not found; install uv yourself (https://docs.astral.sh/uv/)")
    return uv


def _sync_failure(code: int, lines: list[str]) -> BackendError:
    last = " | ".join(lines[-3:])
    if any(NETWORK_PATTERNS.search(line) for line in lines):
        return BackendError(
            "setup_no_network", f"the packages could not be downloaded ({last}); connect to the internet (or set HTTPS_PROXY) and press Set up Backend again"
        )
    if any("No space left" in line for line in lines):
        return BackendError("setup_failed", f"the disk is full ({last}); free some space or choose another Environment folder")
    return BackendError("setup_failed", f"uv sync failed (exit {code}): {last}; see the log above, then press Set up Backend again")


def _run_logged(command, log: LogFn, cancel, env=None, on_line=None, failure=None) -> None:
    log("$ " + " ".join(str(c) for c in command))
    try:
        process = subprocess.Popen(
            [str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1, errors="replace"
        )
    except OSError as error:
        raise BackendError("setup_failed", f"cannot run {command[0]}: {error.strerror}") from None
    last: deque[str] = deque(maxlen=40)
    lines: queue.Queue = queue.Queue()

    def reader() -> None:  # uv can be silent for minutes (one big wheel): cancel must not wait for a line
        assert process.stdout is not None
        for text in process.stdout:
            lines.put(text.rstrip())
        lines.put(None)

    threading.Thread(target=reader, name="im3d-setup-output", daemon=True).start()
    try:
        while True:
            if cancel():
                raise BackendError("setup_cancelled", "setting up the backend was cancelled; press Set up Backend to start again")
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            last.append(line)
            log(line)
            if on_line is not None:
                on_line(line)
    except BaseException:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    if process.wait() != 0:
        if failure is not None:
            raise failure(process.returncode, list(last))
        raise BackendError("setup_failed", f"{Path(command[0]).name} failed (exit {process.returncode}): " + " | ".join(list(last)[-3:]))
