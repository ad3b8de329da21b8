"""Build hook: the wheel (not an editable install) carries the Flower app as data under fl_ietagc/app/.

Installed, the app's packages must not claim the generic top-level names `strategies`, `clients` and
`experiments`; fl_ietagc/app_dir.py finds the copy and imports from it as Flower imports a FAB. An editable install
uses the checkout itself, so it copies nothing (a copy would go stale).
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

APP = ("pyproject.toml", "strategies", "clients", "experiments")


class AppAsData(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name == "wheel" and version == "standard":
            for path in APP:
                build_data["force_include"][path] = f"fl_ietagc/app/{path}"
