"""wsiscan: metastasis detection in whole-slide images after Fast ScanNet (Lin et al.)."""

from importlib.metadata import PackageNotFoundError, version


def _source_tree_version() -> str:
    """The version in ``pyproject.toml`` of the clone this package lies in (the rules run the
    package from its clone, e.g. in the conda environment, where it is not installed)."""
    import tomllib
    from pathlib import Path

    try:
        project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
        return str(project["project"]["version"]) if project["project"]["name"] == "wsiscan" else ""
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return ""


try:
    __version__ = version("wsiscan")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = _source_tree_version() or "0+unknown"
