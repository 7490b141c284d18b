"""The config group ``sweep``, read from the top-level ``sweeps/`` folder.

Sweep definitions live beside ``conf/`` rather than inside it, so a config source maps the group
``sweep`` onto that folder: ``sweep=temperature_alpha`` reads ``sweeps/temperature_alpha.yaml``.
"""

import os
from pathlib import Path
from typing import Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

GROUP = "sweep"
SCHEME = "kdsweep-sweeps"
CHECKOUT = Path(__file__).resolve().parents[2]
CONF_DIR = CHECKOUT / "conf"
SWEEPS_DIR = CHECKOUT / "sweeps"


class SweepsConfigSource(ConfigSource):
    """A folder of YAML files served as the single config group ``sweep``."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _file(self, config_path: str) -> Optional[str]:
        """Return the file behind ``sweep/<name>``, or None for any other path."""
        group, _, name = config_path.partition("/")
        if group != GROUP or not name or "/" in name:
            return None
        return os.path.join(self.path, self._normalize_file_name(name))

    def load_config(self, config_path: str) -> ConfigResult:
        path = self._file(config_path)
        if path is None or not os.path.isfile(path):
            raise ConfigLoadError(f"Config not found: {config_path}")
        with open(path, encoding="utf-8") as file:
            header = ConfigSource._get_header_dict(file.read(512))
            file.seek(0)
            config = OmegaConf.load(file)
        return ConfigResult(config=config, path=f"{SCHEME}://{self.path}", provider=self.provider, header=header)

    def available(self) -> bool:
        return os.path.isdir(self.path)

    def is_group(self, config_path: str) -> bool:
        return config_path in ("", GROUP) and self.available()

    def is_config(self, config_path: str) -> bool:
        path = self._file(config_path)
        return path is not None and os.path.isfile(path)

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> list[str]:
        if not self.available():
            return []
        if config_path == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) else []
        if config_path != GROUP or results_filter == ObjectType.GROUP:
            return []
        return sorted(name[: -len(".yaml")] for name in os.listdir(self.path) if name.endswith(".yaml"))


class SweepsSearchPathPlugin(SearchPathPlugin):
    """Add ``sweeps/`` to kdsweep's config search path, and to no other Hydra application's."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        uses_kdsweep_conf = any(
            element.path in (str(CONF_DIR), f"file://{CONF_DIR}") for element in search_path.get_path()
        )
        if uses_kdsweep_conf:
            search_path.append(provider="kdsweep-sweeps", path=f"{SCHEME}://{SWEEPS_DIR}")
