"""run_benchmark.py's scoring as an Apache Beam pipeline: on the local runner, in this process or in
two worker processes, the records equal an in-process call of each batch; a worker killed part-way
leaves whole records that the same command completes; a retried batch leaves one record per passage;
flags Beam does not know, and runners it does not have, are one line each."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from conftest import BENCHMARK_ARGS, REPO, run_script
from gptj_int8 import benchmark, data, evaluation, memory, models, savedmodel, scoring
from test_errors import _fails_cleanly
from test_resume import PASSAGES, _assert_same_figures, _benchmark, _results

BATCH = int(BENCHMARK_ARGS[BENCHMARK_ARGS.index("--batch_size") + 1])
TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def _sequences(model_dir, num_samples=PASSAGES):
    tok = models.load_tokenizer(model_dir)
    return data.encode_passages(tok, data.load_passages(data.EVALUATION_SET, num_samples),
                                models.context_length(model_dir)), tok.pad_token_id


def _scored_batches(model_dir):
    sequences, pad_id = _sequences(model_dir)
    return data.batches_by_length(sequences, BATCH, pad_id)


def _records(out_dir, name, model_dir, batches):
    """A finished run's records of one model, opened under their own fingerprint."""
    records = scoring.ScoreRecords(out_dir / "scores", name, evaluation.MODELS[name], evaluation.vocab_size(model_dir))
    assert records.open(json.loads((out_dir / "scores" / f"{name}.json").read_text()), batches) == PASSAGES
    return records


@pytest.fixture(scope="module")
def two_workers(workdir, tiny_fp32, converted_fused):
    """run_benchmark.py's output_dir after scoring in two local worker processes."""
    out = workdir / "benchmark-two-workers"
    run_script("run_benchmark.py", "--input_model", tiny_fp32, "--converted_model", converted_fused[1],
               "--output_dir", out, *BENCHMARK_ARGS, *TWO_WORKERS, cwd=workdir)
    return out


def test_batches_by_length_cover_every_passage_once_with_little_padding(tiny_fp32):
    batches = _scored_batches(tiny_fp32)
    assert sorted(np.concatenate([ix for ix, _ in batches])) == list(range(PASSAGES))
    lengths = np.concatenate([batch[1].sum(axis=1) for _, batch in batches])
    assert np.all(np.diff(lengths) >= 0)                    # sorted by length: padding is at most a gap
    again = _scored_batches(tiny_fp32)                      # the same batches on every run
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1][0], b[1][0]) for a, b in zip(batches, again))


@pytest.mark.parametrize("where", ["in this process", "two worker processes"])
def test_records_equal_an_in_process_call_of_each_batch(where, tiny_fp32, converted_fused, benchmarked, two_workers):
    out = benchmarked[1] if where == "in this process" else two_workers
    batches = _scored_batches(tiny_fp32)
    for name, model_dir in (("original", tiny_fp32), ("converted", converted_fused[1])):
        rows = _records(out, name, model_dir, batches).read(batches)
        assert list(rows["passage"]) == list(range(PASSAGES))
        _, fn = savedmodel.load_serving_function(model_dir)
        for indices, batch in batches:
            last, token_hit, word_hit = benchmark.score_batch(fn, batch)
            got = rows[indices]
            assert np.array_equal(got["logits"], last), name
            assert np.array_equal(got["token_hit"], token_hit) and np.array_equal(got["word_hit"], word_hit)
    if out is two_workers:
        _assert_same_figures(two_workers, benchmarked[1])


def test_retried_batch_leaves_one_record_per_passage(tmp_path, tiny_fp32):
    """A bundle Beam retries writes its batches again: the same file, whole, under the same name."""
    batches = _scored_batches(tiny_fp32)
    vocab = evaluation.vocab_size(tiny_fp32)
    records = scoring.ScoreRecords(tmp_path / "scores", "original", "FP32", vocab)
    records.open({"any": "fingerprint"}, batches)
    _, fn = savedmodel.load_serving_function(tiny_fp32)
    write = scoring.WriteRecords(records.folder, vocab)
    for key, (indices, *batch) in records.todo(batches):
        scored = benchmark.score_batch(fn, tuple(batch))
        for _ in range(2):
            assert list(write.process((key, (indices, *scored)))) == [key]
    assert len(list((tmp_path / "scores" / "original").iterdir())) == len(batches)
    assert records.todo(batches) == [] and records.count(batches) == PASSAGES
    assert list(records.read(batches)["passage"]) == list(range(PASSAGES))


def test_missing_records_are_scored_and_the_rest_kept(tmp_path, tiny_fp32, converted_fused, benchmarked):
    """What an interrupted run leaves: whole record files, and temporary ones of writes cut short.
    The same command scores the batches without a file, and gives the uninterrupted run's figures."""
    shutil.copytree(benchmarked[1] / "scores", tmp_path / "scores")
    folder = tmp_path / "scores" / "converted"
    files = sorted(folder.glob("*.npy"))
    gone = files[:3]
    for f in gone:
        f.unlink()
    (folder / f"{files[4].name}.0123.tmp").write_bytes(b"cut short")
    kept = PASSAGES - sum(int(f.name.split("-")[1]) for f in gone)
    proc = _benchmark(tmp_path, tiny_fp32, converted_fused, cwd=tmp_path)
    assert f"INT8: {kept} of {PASSAGES} passages recorded" in proc.stderr
    assert f"FP32: all {PASSAGES} passages scored already" in proc.stderr
    assert sorted(folder.glob("*.npy")) == files and not list(folder.glob("*.tmp"))
    _assert_same_figures(tmp_path, benchmarked[1])


# Enough passages, one per batch, that a run stopped at its first record is stopped part-way
MANY = ["--num_samples", "200", "--batch_size", "1", "--warmup", "0", "--iterations", "1", "--gen_samples", "0"]


@pytest.fixture(scope="module")
def many_passages(workdir, tiny_fp32, converted_fused):
    """An uninterrupted run's output_dir with MANY's flags."""
    out = workdir / "benchmark-many"
    _benchmark(out, tiny_fp32, converted_fused, *MANY, cwd=workdir)
    return out


def _stopped_at_first_record(tmp_path, tiny_fp32, converted_fused, stop, *extra):
    """Start run_benchmark.py with MANY's flags, call stop(process) once a batch is recorded; (its
    exit code, its stderr, how many passages were recorded)."""
    out = tmp_path / "out"
    args = ["--input_model", tiny_fp32, "--converted_model", converted_fused[1], "--output_dir", out,
            *BENCHMARK_ARGS, *MANY, *extra]
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "run_benchmark.py"), *map(str, args)], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while not list((out / "scores").glob("*/*.npy")):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "stderr").read_text()[-3000:]
            time.sleep(0.01)
        stop(proc)
        proc.wait(timeout=120)
    return proc.returncode, (tmp_path / "stderr").read_text(), len(list((out / "scores").glob("*/*.npy")))


def test_interrupted_run_then_the_same_command_resumes(tmp_path, tiny_fp32, converted_fused, many_passages):
    """`kill` (or Ctrl-C) once a batch is recorded, then the same command: it keeps what was recorded,
    scores the rest, and gives the uninterrupted run's figures."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        pytest.skip("SIGTERM is ignored by the process running the tests, and by its children")
    code, stderr, recorded = _stopped_at_first_record(tmp_path, tiny_fp32, converted_fused,
                                                      lambda proc: proc.send_signal(signal.SIGTERM))
    assert code == 130 and stderr.strip().splitlines()[-1] == "error: interrupted", stderr[-3000:]
    assert 0 < recorded < 400, recorded                                     # part-way

    again = _benchmark(tmp_path / "out", tiny_fp32, converted_fused, *MANY, cwd=tmp_path)
    kept = [int(n) for n in re.findall(r"(?:FP32|INT8): (\d+) of 200 passages recorded", again.stderr)]
    kept += [200 for _ in re.findall(r"all 200 passages scored already", again.stderr)]
    assert sum(kept) == recorded, again.stderr[-3000:]
    assert len(list((tmp_path / "out" / "scores").glob("*/*.npy"))) == 400
    _assert_same_figures(tmp_path / "out", many_passages)


def test_killed_worker_then_the_same_command_resumes(tmp_path, tiny_fp32, converted_fused, many_passages):
    """SIGKILL to one of two local worker processes once a batch is recorded: the run ends with one
    line (Beam's local runner alone would wait for the worker for ever), the records written are
    whole, and the same command scores only what is missing, with the figures of an uninterrupted run."""
    killed = []

    def kill_a_worker(proc):
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if p.name().startswith("python") and "sdk_worker_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[0].kill()
        killed.append(workers[0].pid)
    code, stderr, recorded = _stopped_at_first_record(tmp_path, tiny_fp32, converted_fused, kill_a_worker,
                                                      *TWO_WORKERS)
    assert code == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: Beam's worker process {killed[0]} ended part-way"), last
    assert 0 < recorded < 400, recorded

    _benchmark(tmp_path / "out", tiny_fp32, converted_fused, *MANY, *TWO_WORKERS, cwd=tmp_path)
    assert len(list((tmp_path / "out" / "scores").glob("*/*.npy"))) == 400
    _assert_same_figures(tmp_path / "out", many_passages)


@pytest.mark.parametrize("flag, words", [
    ("--no_such_flag=3", "unknown flag --no_such_flag: neither run_benchmark.py's"),
    ("--runner=NoSuchRunner", "--runner NoSuchRunner: Unexpected pipeline runner: NoSuchRunner"),
    ("--direct_running_mode=everywhere", "Apache Beam option: argument --direct_running_mode: invalid choice"),
])
def test_bad_beam_flags_are_one_line_and_score_nothing(tmp_path, tiny_fp32, converted_fused, flag, words):
    proc = _benchmark(tmp_path / "out", tiny_fp32, converted_fused, flag, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    _fails_cleanly(proc, words)
    assert "scoring" not in proc.stderr and not (tmp_path / "out").exists()


def test_local_workers_that_cannot_each_hold_a_model_are_refused(tmp_path, tiny_fp32, converted_fused):
    """The memory plan counts the worker processes it starts: a limit that holds the run in one process
    but not a model in each of two workers is refused, in one line, before loading."""
    sequences, pad_id = _sequences(tiny_fp32)
    vocab = evaluation.vocab_size(tiny_fp32)
    phases = evaluation.run_phases(data.batches(sequences, BATCH, pad_id), vocab, generating=True)
    _, alone = memory.needs({"FP32": tiny_fp32, "INT8": converted_fused[1]}, phases)
    larger = max(memory.scoring_need([m], *phases[0], processes=2) for m in (tiny_fp32, converted_fused[1]))
    limit = round((max(alone.values()) + larger) / 2e9, 3)
    assert max(alone.values()) < limit * 1e9 < larger
    proc = _benchmark(tmp_path / "out", tiny_fp32, converted_fused, "--max_memory_gb", limit, *TWO_WORKERS,
                      cwd=tmp_path, check=False)
    _fails_cleanly(proc, "scoring with 2 worker processes, each holding the", "use fewer --direct_num_workers")
    assert not (tmp_path / "out").exists()


def test_beams_notes_about_absent_cloud_libraries_are_not_shown():
    """Importing the scoring imports Beam, which logs that Google Cloud's client libraries are absent:
    nothing a user of the local runner needs, so not shown."""
    proc = subprocess.run([sys.executable, "-c", "from gptj_int8 import scoring"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert "apitools" not in proc.stderr
