"""Installs the gptj_int8 package, for Apache Beam's workers on a cluster: run_benchmark.py ...
--setup_file ./setup.py (or `pip install .` in a worker image). The scripts themselves need no
install: they run from this folder."""
import setuptools

setuptools.setup(name="gptj-int8", version="0.1.0", packages=["gptj_int8"], python_requires=">=3.10")
