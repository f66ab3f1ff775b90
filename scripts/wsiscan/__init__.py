"""wsiscan: metastasis detection in whole-slide images after Fast ScanNet (Lin et al.)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsiscan")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"
