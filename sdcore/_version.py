# The one place sdcore's version is written: pyproject.toml reads it (as the package metadata's version)
# and sdcore.__version__ imports it. What each version adds: CHANGELOG.md.
__version__ = "0.1.0"
