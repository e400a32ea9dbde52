"""The environment holds one TensorFlow: tensorflow-cpu beside tensorflow (or any two distributions
of the `tensorflow` package) write the same folder, the last installed wins, and uninstalling either
breaks the other."""
import importlib.metadata


def test_one_distribution_provides_tensorflow():
    dists = sorted(set(importlib.metadata.packages_distributions().get("tensorflow", [])))
    assert len(dists) == 1, (
        f"{len(dists)} distributions provide the tensorflow package, one expected: {dists}; "
        f"to fix: pip uninstall -y {' '.join(dists)} && pip install -r requirements.txt")
