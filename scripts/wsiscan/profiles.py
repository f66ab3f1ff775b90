"""Install the repository's Snakemake profiles where ``snakemake --profile <name>`` finds them.

Snakemake resolves a bare profile name (``--profile slurm``) in the current directory, then in the
user's configuration folder (``$XDG_CONFIG_HOME/snakemake`` or ``~/.config/snakemake`` on Linux,
as given by platformdirs, the library Snakemake itself asks), then in the site folder
(``/etc/xdg/snakemake``). A workflow's ``profiles/slurm`` is in none of them, so
:func:`install_profile` links (or copies) it into the user's folder. Which one: the profile of the
folder the command runs in (the clone, or a deployment that uses wsiscan as a module and carries a
``profiles/`` copy), else that of the clone the package was installed from (:func:`default_source`);
the command says which.
"""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
import time
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

REPO_PROFILES = Path(__file__).resolve().parents[2] / "profiles"


def default_source(name: str, cwd: Path | None = None) -> tuple[Path, str]:
    """The profile folder ``install-profile`` links when no ``--source`` is given, and a phrase
    saying where it comes from: ``profiles/<name>`` of the current folder when it holds one (the workflow the
    user works in), else that of the clone this package was installed from."""
    here = (Path(cwd) if cwd is not None else Path.cwd()) / "profiles" / name
    if (here / "config.yaml").is_file():
        return here.resolve(), f"profiles/{name} of the current folder"
    return (REPO_PROFILES / name).resolve(), (
        f"of the clone wsiscan is installed from: the current folder has no profiles/{name}; "
        "pass --source to link another"
    )


def user_profile_root() -> Path:
    """The folder in which Snakemake looks up bare profile names for this user."""
    from platformdirs import user_config_dir

    # Snakemake uses AppDirs("snakemake", "snakemake"): the same call gives the same folder.
    return Path(user_config_dir("snakemake", "snakemake"))


def _same_tree(a: Path, b: Path) -> bool:
    """True when directories ``a`` and ``b`` hold the same files with the same bytes."""
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


def _describe(target: Path, source: Path) -> str:
    """What ``target`` is, for messages."""
    if target.is_symlink():
        return f"a link to {os.readlink(target)}"
    if target.is_dir():
        same = _same_tree(target, source)
        return f"a folder with {'the same' if same else 'different'} files"
    return "a file"


def _is_installed(target: Path, source: Path, copy: bool) -> bool:
    """True when ``target`` already is what would be installed: a link to ``source`` (or, with
    ``copy``, a folder with the same files)."""
    if target.is_symlink():
        return not copy and target.resolve() == source.resolve()
    return copy and target.is_dir() and _same_tree(target, source)


def install_profile(
    name: str = "slurm",
    *,
    source: Path | None = None,
    dest_root: Path | None = None,
    copy: bool = False,
    force: bool = False,
) -> Path:
    """Make ``snakemake --profile <name>`` use the profile folder ``source``.

    ``source`` defaults to :func:`default_source` (``profiles/<name>`` of the current folder, else
    of the clone the package was installed from), ``dest_root`` to :func:`user_profile_root`. Creates ``dest_root/<name>`` as a symbolic link to ``source`` (or, with
    ``copy``, a copy of it). Nothing is done when it already is that link (or that identical copy).
    Anything else of that name is an error unless ``force``: then it is moved aside to
    ``<name>.bak-<YYYYmmdd-HHMMSS>``, never deleted. Returns the installed path.
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ConfigError(f"install-profile: invalid profile name {name!r}")
    source = Path(source).resolve() if source is not None else default_source(name)[0]
    if not (source / "config.yaml").is_file():
        raise ConfigError(
            f"install-profile: {source} is not a Snakemake profile (no config.yaml); "
            "run from a folder with profiles/<name> or pass --source"
        )
    root = Path(dest_root) if dest_root is not None else user_profile_root()
    target = root / name
    if target.is_symlink() or target.exists():
        if _is_installed(target, source, copy):
            log.info("profile %r already installed: %s (%s)", name, target, source)
            return target
        if not force:
            raise ConfigError(
                f"install-profile: {target} already exists ({_describe(target, source)}); "
                f"pass --force to move it aside and install {'a copy of' if copy else 'a link to'}"
                f" {source}"
            )
        backup = target.with_name(f"{name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while backup.exists() or backup.is_symlink():
            backup = target.with_name(f"{name}.bak-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            n += 1
        os.rename(target, backup)
        log.warning("moved the existing profile %s aside to %s", target, backup)
    root.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    elif tmp.exists():
        shutil.rmtree(tmp)
    if copy:
        shutil.copytree(source, tmp, symlinks=False)
    else:
        tmp.symlink_to(source, target_is_directory=True)
    os.replace(tmp, target)
    log.info("installed profile %r: %s %s %s", name, target, "copy of" if copy else "->", source)
    return target
