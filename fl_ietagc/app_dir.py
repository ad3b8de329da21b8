"""Where the Flower app lives, and how the core reaches its launchers without claiming import names.

The Flower app is a folder with `pyproject.toml` ([tool.flwr.app]) and the top-level packages its components
name: `strategies/` (the ServerApp), `clients/` (the ClientApp) and `experiments/` (launchers, studies). Flower
imports them with the app folder on `sys.path` (what it does with a FAB), so they keep their short names there.
An installed wheel must not claim such generic names in site-packages, so it ships the app as data under
`fl_ietagc/app/`; a source checkout (or an editable install) uses the checkout itself. `app_dir()` finds it;
`app_module(name)` imports one of its modules the way Flower does.
"""

from __future__ import annotations

import importlib
import sys
import tomllib
from pathlib import Path
from types import ModuleType

from fl_ietagc.settings.config import ConfigError
from fl_ietagc.settings.console import closed_stdout_is_quiet

_PACKAGE = Path(__file__).resolve().parent
APP_PACKAGES = ("strategies", "clients", "experiments")


def _is_app(folder: Path) -> bool:
    return (folder / "pyproject.toml").is_file() and all((folder / p / "__init__.py").is_file() for p in APP_PACKAGES)


def app_dir() -> Path:
    """The source checkout holding fl_ietagc/, or the copy an installed wheel ships in fl_ietagc/app/."""
    for folder in (_PACKAGE.parent, _PACKAGE / "app"):
        if _is_app(folder):
            return folder
    raise ConfigError(
        f"no Flower app next to {_PACKAGE} (neither a source checkout nor an installed wheel's "
        f"fl_ietagc/app/ with pyproject.toml and {', '.join(APP_PACKAGES)}): reinstall fl-ietagc"
    )


def check_app_project(folder: Path) -> dict:
    """The app's pyproject.toml, read strictly: TOML, with [tool.flwr.app] naming a serverapp and a clientapp
    component; else one line naming the file (Flower's own reader raises deep inside, without naming it)."""
    from fl_ietagc.settings.paths import described, kind  # (tempfile, shutil: not at every flower-simulation start)

    path = Path(folder) / "pyproject.toml"
    what = kind(path)
    if what != "file":
        raise ConfigError(
            f"--app {folder}: {path} is {'missing' if what == 'missing' else described(what)}; "
            f"an app folder has a pyproject.toml"
        )
    try:
        project = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--app {folder}: {path} is not valid TOML ({e})") from None
    app = project.get("tool", {}).get("flwr", {}).get("app") if isinstance(project.get("tool"), dict) else None
    if not isinstance(app, dict):
        raise ConfigError(f"--app {folder}: {path} has no [tool.flwr.app] table (not a Flower app)")
    components = app.get("components")
    missing = [
        c
        for c in ("serverapp", "clientapp")
        if not isinstance(components, dict) or not isinstance(components.get(c), str)
    ]
    if missing:
        raise ConfigError(
            f"--app {folder}: {path}: [tool.flwr.app.components] has no {' / '.join(missing)} (module:object)"
        )
    if not isinstance(app.get("config", {}), dict):
        raise ConfigError(f"--app {folder}: {path}: [tool.flwr.app.config] must be a table")
    return project


def app_module(name: str) -> ModuleType:
    """Import `name` (e.g. "experiments.launch.simulate") from the app folder, which goes first on sys.path."""
    folder = str(app_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def flower_simulation() -> int:
    """Console script `flower-simulation`."""
    return closed_stdout_is_quiet(lambda: app_module("experiments.launch.simulate").main())


def study() -> int:
    """Console script `fl-ietagc-study`."""
    return closed_stdout_is_quiet(lambda: app_module("experiments.studies.cli").main())
