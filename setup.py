"""setuptools' half of the build: the C run loop, compiled by cffi (the rest is in pyproject.toml).

Compiling needs a C compiler and Python's headers. Without them the
package installs without the C loop, with a warning here, and minivmm says
at start that it runs the Python loop instead (minivmm/kvm/runloop.py).
"""

import os
import shutil
import sys
import sysconfig

from setuptools import setup


def _missing() -> str | None:
    """What compiling the C loop lacks, or None."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ('{cc}' not found)"
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.exists(headers):
        return f"no Python headers ({headers} not found)"
    return None


missing = _missing()
if missing:
    print(
        f"minivmm: WARNING: {missing}: the C run loop is not built; minivmm will run the Python loop "
        "(install gcc and the Python development headers, then reinstall, for the C loop)",
        file=sys.stderr,
    )
setup(cffi_modules=[] if missing else ["minivmm/kvm/runloop_build.py:ffibuilder"])
