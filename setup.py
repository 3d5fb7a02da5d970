"""Maps the top-level folders onto the single import name `slimtrain` (see DESIGN.md, "Layout")."""

from setuptools import find_packages, setup

TOP_LEVEL = ("core", "trainer", "modules", "data")


def _packages() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for top in TOP_LEVEL:
        for sub in [""] + find_packages(top):
            name = f"slimtrain.{top}" + (f".{sub}" if sub else "")
            packages.append(name)
            package_dir[name] = top + ("/" + sub.replace(".", "/") if sub else "")
    return packages, package_dir


packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir, package_data={"slimtrain.trainer": ["*.j2", "templates/*"]})
