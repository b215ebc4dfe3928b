"""adapterflow: a declarative retraining pipeline for LoRA adapters.

The repository keeps its three code folders at the top level (flows/, tasks/, adapters/); the
package build maps them to adapterflow.flows, adapterflow.tasks and adapterflow.adapters
(pyproject.toml, [tool.setuptools] package-dir). Nothing installs as a bare top-level `flows`,
`tasks` or `adapters`: those names belong to other projects (AdapterHub's library is `adapters`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("adapterflow")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
