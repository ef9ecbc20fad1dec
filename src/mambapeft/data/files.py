"""The task tables (vision/tasks.yaml, language/tasks.yaml) read with errors that say what to do."""

from pathlib import Path

import yaml

from mambapeft.data.errors import DataError


def read_yaml(path: Path):
    """Parse a YAML file shipped with the repository (task tables), as DataError when missing or invalid."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; it ships with the repository, restore it from git") from None
    except yaml.YAMLError as error:
        raise DataError(f"{path}: not valid YAML ({error}); fix the syntax") from None
