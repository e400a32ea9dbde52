"""The environment holds one TensorFlow: tensorflow-cpu beside tensorflow (or any two distributions
of the `tensorflow` package) write the same folder, the last installed wins, and uninstalling either
breaks the other."""
import importlib.metadata


def test_one_distribution_provides_tensorflow():
    dists = sorted(set(importlib.metadata.packages_distributions().get("tensorflow", [])))
    assert len(dists) == 1, (
        f"{len(dists)} distributions provide the tensorflow package, one expected: {dists}; "
        f"to fix: pip uninstall -y {' '.join(dists)} && pip install -r requirements.txt")


def test_nothing_but_the_scripts_own_lines_reach_the_terminal(tmp_path):
    """A script started as a user starts it: TensorFlow's CUDA probing and absl's start-up notices
    (printed from C++ on a machine without a GPU) do not reach its stderr."""
    import tensorflow as tf
    from conftest import run_script
    graph = tmp_path / "g.pb"
    graph.write_bytes(tf.function(lambda x: x + 1.0).get_concrete_function(
        tf.TensorSpec([2], tf.float32)).graph.as_graph_def().SerializeToString())
    proc = run_script("pb_to_pbtxt.py", "--input", graph, cwd=tmp_path, fresh_process=True)
    assert (tmp_path / "g.pbtxt").exists(), proc.stderr
    noise = [line for line in proc.stderr.splitlines()
             if any(w in line for w in ("cuda", "CUDA", "cuInit", "TensorRT", "absl::InitializeLog", "oneDNN custom"))]
    assert noise == [], proc.stderr
