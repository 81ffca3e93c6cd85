"""`pip install .`: the tokenlake Python package (python/tokenlake) with its extension module.

The extension is built by the project's own CMake (the `_tokenlake` target, Release, no tests
or benchmarks) into build/python-package, with the interpreter that runs this script; nothing
is downloaded (Debian's setuptools, pybind11 and the project's other dependencies, which
scripts/install-deps.sh installs).
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build = os.path.join(ROOT, "build", "python-package")
        subprocess.check_call([
            "cmake", "-S", ROOT, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
            "-DTOKENLAKE_BUILD_TESTS=OFF", "-DTOKENLAKE_BUILD_BENCHMARKS=OFF",
            "-DTOKENLAKE_PYTHON=ON", f"-DPython3_EXECUTABLE={sys.executable}",
        ])
        subprocess.check_call(["cmake", "--build", build, "--target", "_tokenlake",
                               "-j", str(os.cpu_count() or 1)])
        built = os.path.join(build, "python", "tokenlake")
        so = [f for f in os.listdir(built) if f.startswith("_tokenlake") and f.endswith(".so")]
        if len(so) != 1:
            raise RuntimeError(f"expected one _tokenlake*.so in {built}, found {so}")
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(os.path.join(built, so[0]), dest)


setup(
    name="tokenlake",
    version="0.1.0",
    description="TokenLake: a unified segment-level prefix cache pool for LLM serving",
    packages=["tokenlake"],
    package_dir={"": "python"},
    ext_modules=[Extension("tokenlake._tokenlake", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    zip_safe=False,
)
