"""Packaging for paperlab, nbdev 2 style: every setting comes from settings.ini (pyproject.toml marks them dynamic)."""
from configparser import ConfigParser
from pathlib import Path

import setuptools
from setuptools.command.build_py import build_py


class BuildPyWithBook(build_py):
    "build_py that also copies the book's data/ and nbs/ into the wheel as paperlab/_book/ (read by paperlab.core.book_path)."

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False): return   # an editable install reads them from its checkout
        for sub in ("data", "nbs"):
            if Path(sub).is_dir():
                self.copy_tree(sub, str(Path(self.build_lib) / cfg["lib_path"] / "_book" / sub))

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]
readme = Path("README.md")

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=readme.read_text(encoding="utf-8") if readme.exists() else cfg["description"],
    long_description_content_type="text/markdown",
    keywords=cfg["keywords"].split(),
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="Apache-2.0",
    url=cfg["git_url"],
    project_urls={"Documentation": cfg["doc_host"]},
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
    packages=setuptools.find_packages(include=[cfg["lib_path"], cfg["lib_path"] + ".*"]),
    include_package_data=True,
    python_requires=">=" + cfg["min_python"],
    install_requires=cfg["requirements"].split(),
    extras_require={"dev": cfg["dev_requirements"].split()},
    scripts=[],
    entry_points={
        "console_scripts": cfg["console_scripts"].split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    zip_safe=False,
    cmdclass={"build_py": BuildPyWithBook},
)
