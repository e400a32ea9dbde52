"""run_benchmark.py's scoring as an Apache Beam pipeline: each passage's last-token logits and hits,
written batch by batch as records under <output_dir>/scores/, so that a run on any runner resumes
where the last one stopped.

    batches not yet recorded -> RunInference(ServingHandler: the SavedModel's serving_default,
    loaded once per worker) -> WriteRecords (one file per batch)

The same pipeline runs locally by default (Beam's FnApiRunner, the pure-Python runner under
DirectRunner: in this process, or in `--direct_num_workers` processes with
`--direct_running_mode=multi_processing`) and on Dataflow, Flink or Spark with Beam's own flags.

Records: <scores>/<model>.json, the fingerprint of what made them (the model's files, the dataset
and its passages, the flags scoring depends on); <scores>/<model>/<batch key>.npy, one batch's
records, its name derived from the fingerprint and the batch's passages. A file is written under a
temporary name and renamed, so it is whole or absent; a retried bundle writes the same file again.
The batches are formed here, from the passages sorted by length, and are the same on every run with
the same fingerprint, so a rerun finds which are recorded from the file names alone.
`<output_dir>` may be any path Beam's FileSystems know (local, gs://, s3://, hdfs://): a cluster's
workers need storage they share with this process.
"""
import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import threading
import uuid
import weakref
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import benchmark, savedmodel
from .cli import UserError

log = logging.getLogger(__name__)


class _WithoutBeamsNotes(logging.Filter):
    """Two warnings Beam logs that say nothing about our run: at import (this module's ServingHandler
    imports Beam, so the filter comes first), that Google Cloud's client libraries are absent (they
    are for Dataflow and BigQuery); at every model load where torch is absent, that it cannot read
    the process's memory (its import of `resource` shares a try block with a torch-only module)."""

    NOTES = ("apitools not found", "memory usage cannot be fetched")

    def filter(self, record):
        return not any(note in record.getMessage() for note in self.NOTES)


logging.getLogger().addFilter(_WithoutBeamsNotes())


RECORDS_FORMAT = 2                                      # bumped when a record's layout changes
# Runners that run on this machine, whose worker processes the memory plan counts. Our default is
# FnApiRunner: DirectRunner first tries the Prism runner, which downloads a binary.
LOCAL_RUNNERS = {"FnApiRunner", "DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner"}
DEFAULT_RUNNER = "FnApiRunner"
# How often the progress bars look at the records: listing a bucket costs more than a local folder
PROGRESS_SECONDS = {"local": 0.5, "remote": 10}


##### Files through Beam's FileSystems (local paths, gs://, s3://, hdfs://) #####

def join(folder, *names):
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.join(str(folder), *names)


def split(path):
    """(folder, name) of a path."""
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.split(str(path))


def exists(path):
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.exists(str(path))


def is_local(path):
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.get_scheme(str(path)) in (None, "file")


def write_file(path, data):
    """Write bytes whole or not at all: to a temporary name beside `path`, then renamed over it."""
    from apache_beam.io.filesystems import FileSystems
    path = str(path)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    if is_local(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    with FileSystems.create(tmp) as f:
        f.write(data)
    FileSystems.rename([tmp], [path])


def read_file(path):
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.open(str(path)) as f:
        return f.read()


def list_files(folder, pattern="*"):
    """Paths of the files in `folder` (not below it) matching `pattern`; none when it does not exist."""
    from apache_beam.io.filesystems import FileSystems
    return [m.path for m in FileSystems.match([join(folder, pattern)])[0].metadata_list]


def delete_files(paths):
    from apache_beam.io.filesystems import FileSystems
    if paths:
        FileSystems.delete(list(paths))


##### The records of scored passages #####

def record_dtype(vocab):
    return np.dtype([("passage", "<i8"), ("token_hit", "?"), ("word_hit", "?"), ("logits", "<f4", (vocab,))])


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model_dir):
    """Hashes of a SavedModel's graph and of its variables' index (which holds every tensor's checksum)."""
    model_dir = Path(model_dir)
    files = [model_dir / "saved_model.pb", model_dir / "variables" / "variables.index"]
    return {f.relative_to(model_dir).as_posix(): _sha256(f) for f in files if f.exists()}


def fingerprint(model_dir, settings, sequences, context_length, vocab):
    """What a model's records depend on: a change of any of it scores the model afresh."""
    dataset = Path(settings.dataset)
    passages = hashlib.sha256(json.dumps(sequences).encode()).hexdigest()
    return {"format": RECORDS_FORMAT, "model": model_identity(model_dir),
            "dataset": str(dataset.resolve()) if dataset.exists() else settings.dataset,
            "num_samples": settings.num_samples, "batch_size": settings.batch_size,
            "context_length": context_length, "vocab": vocab, "passages": passages}


def _changes(old, new):
    """Why records made under `old` do not serve `new`, in words."""
    said = {"model": "the model changed", "passages": "the passages changed (dataset file or tokenizer)",
            "format": "the records' format changed"}
    changed = [k for k in new if old.get(k) != new[k]]
    if changed != ["passages"]:                     # a changed flag or dataset explains changed passages
        changed = [k for k in changed if k != "passages"]
    return ", ".join(said.get(k, f"{k} changed ({old.get(k)} -> {new[k]})") for k in changed)


class ScoreRecords:
    """One model's scored passages: `<scores>/<name>/<batch key>.npy` per batch and `<scores>/<name>.json`,
    the fingerprint of what made them."""

    def __init__(self, scores_dir, name, label, vocab):
        self.folder = join(scores_dir, name)
        self.fingerprint_path = join(scores_dir, f"{name}.json")
        self.old_records = join(scores_dir, f"{name}.bin")          # records format 1: one file
        self.label = label
        self.dtype = record_dtype(vocab)
        self.salt = ""

    def open(self, fingerprint, batches, fresh=False):
        """Keep the records made under the same fingerprint, or start afresh (saying why); remove what
        an interrupted write left. `batches`: batches_by_length's. Returns how many passages are kept."""
        try:
            stored = json.loads(read_file(self.fingerprint_path)) if exists(self.fingerprint_path) else None
        except (OSError, ValueError):
            stored = "unreadable"
        self.salt = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        if fresh:
            why = "--fresh"
        elif stored == fingerprint:
            why = None
        elif stored is None:
            why = "no fingerprint beside its records" if list_files(self.folder, "*.npy") else ""   # "": a first run
        elif stored == "unreadable":
            why = "its fingerprint is unreadable"
        else:
            why = _changes(stored, fingerprint)
        delete_files(list_files(self.folder, "*.tmp"))
        if why is not None:
            if why:
                log.info("%s: scoring afresh: %s", self.label, why)
            delete_files(list_files(self.folder) + ([self.old_records] if exists(self.old_records) else []))
            write_file(self.fingerprint_path, json.dumps(fingerprint, indent=1).encode())
            return 0
        done = self.recorded(batches)
        kept, total = sum(len(indices) for indices, _ in batches if self.key(indices) in done), \
            sum(len(indices) for indices, _ in batches)
        if kept == total:
            log.info("%s: all %d passages scored already (%s): scoring skipped", self.label, total, self.folder)
        elif kept:
            log.info("%s: %d of %d passages recorded in %s: scoring the other %d", self.label, kept, total,
                     self.folder, total - kept)
        return kept

    def key(self, indices):
        """A batch's file name (without .npy): its first passage, its size and a digest of its passages
        under this fingerprint, so the same batch always gets the same name."""
        digest = hashlib.sha256(f"{self.salt}:{','.join(map(str, indices))}".encode()).hexdigest()[:16]
        return f"{int(indices[0]):06d}-{len(indices)}-{digest}"

    def recorded(self, batches):
        """The keys of `batches` whose records are on storage."""
        names = {split(p)[1] for p in list_files(self.folder, "*.npy")}
        return {self.key(indices) for indices, _ in batches if f"{self.key(indices)}.npy" in names}

    def todo(self, batches):
        """[(key, (indices, input_ids, attention_mask, word_lengths))] of the batches not yet recorded."""
        done = self.recorded(batches)
        return [(self.key(indices), (indices, *batch)) for indices, batch in batches if self.key(indices) not in done]

    def count(self, batches):
        """Passages of `batches` recorded so far."""
        done = self.recorded(batches)
        return sum(len(indices) for indices, _ in batches if self.key(indices) in done)

    def read(self, batches):
        """Every passage's record, in passage order: [passages] of record_dtype."""
        parts = [np.load(io.BytesIO(read_file(join(self.folder, f"{self.key(indices)}.npy")))) for indices, _ in batches]
        rows = np.concatenate(parts)
        return rows[np.argsort(rows["passage"], kind="stable")]


def records_bytes(indices, last_logits, token_hits, word_hits, vocab):
    """One batch's records as the bytes of a .npy file."""
    rows = np.zeros(len(indices), record_dtype(vocab))
    rows["passage"], rows["token_hit"], rows["word_hit"], rows["logits"] = indices, token_hits, word_hits, last_logits
    out = io.BytesIO()
    np.save(out, rows)
    return out.getvalue()


##### The pipeline's parts: what a worker runs #####

_loaded_scorers = weakref.WeakSet()     # every Scorer of this process, so that release_models can free them


class Scorer:
    """A SavedModel's serving_default, scoring one batch at a time (what ServingHandler loads)."""

    def __init__(self, model_dir):
        self.model, self.fn = savedmodel.load_serving_function(model_dir)
        _loaded_scorers.add(self)

    def score(self, indices, input_ids, attention_mask, word_lengths):
        if self.fn is None:
            raise RuntimeError("this model was released")
        return (indices, *benchmark.score_batch(self.fn, (input_ids, attention_mask, word_lengths)))

    def release(self):
        self.model = self.fn = None


def release_models():
    """Free the models a pipeline loaded in this process. Beam keeps the last model a RunInference
    loaded alive (its Shared cache), which would otherwise be held through the timing that follows."""
    scorers = list(_loaded_scorers)
    for scorer in scorers:
        scorer.release()
    if scorers:                             # a model's traced functions are freed by the collector
        import gc
        gc.collect()


def _model_handler_base():
    from apache_beam.ml.inference.base import ModelHandler
    return ModelHandler


class ServingHandler(_model_handler_base()):
    """RunInference's handler for our SavedModels: each element is one batch, formed beforehand
    (batches_by_length), so a batch is never merged with another or padded further. Beam's own
    TFModelHandlerTensor loads with tf.keras (which Keras 3 refuses for SavedModel folders) and
    stacks equal shapes only. With `model_copies`, that many copies per machine are shared by its
    worker processes (Beam's large-model mode) instead of one per process."""

    def __init__(self, model_dir, model_copies=None):
        super().__init__(min_batch_size=1, max_batch_size=1, large_model=model_copies is not None,
                         model_copies=model_copies)
        self.model_dir = str(model_dir)

    def load_model(self):
        return Scorer(self.model_dir)

    def run_inference(self, batch, model, inference_args=None):
        return [model.score(*element) for element in batch]

    def get_num_bytes(self, batch):
        return sum(part.nbytes for element in batch for part in element)


def _do_fn_base():
    import apache_beam as beam
    return beam.DoFn


class WriteRecords(_do_fn_base()):
    """Writes each scored batch ((key, (indices, last logits, token hits, word hits))) to <folder>/<key>.npy."""

    def __init__(self, folder, vocab):
        self.folder, self.vocab = folder, vocab

    def process(self, element):
        key, scored = element
        write_file(join(self.folder, f"{key}.npy"), records_bytes(*scored, self.vocab))
        yield key


##### Options and the run #####

def pipeline_options(beam_args):
    """PipelineOptions from the flags run_benchmark.py does not know, our local runner when none is
    named; UserError, in one line, for a flag Beam does not know, a bad value or an unknown runner."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, WorkerOptions
    from apache_beam.runners import create_runner
    stray = [a for a in beam_args if not a.startswith("--")]
    if stray:
        raise UserError(f"unexpected argument {stray[0]!r}: flags take the form --name value or --name=value")
    options = PipelineOptions(beam_args)
    errors = io.StringIO()
    try:
        # Beam's parser prints its whole usage and exits on a bad value: keep only its last line
        with contextlib.redirect_stderr(errors):
            known = options.get_all_options()
            every = options.get_all_options(retain_unknown_options=True)
    except SystemExit:
        raise UserError("Apache Beam option: " + errors.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1])
    unknown = sorted(set(every) - set(known))
    if unknown:
        raise UserError(f"unknown flag --{unknown[0]}: neither run_benchmark.py's (see --help) nor an Apache Beam "
                        "pipeline option")
    standard = options.view_as(StandardOptions)
    standard.runner = standard.runner or DEFAULT_RUNNER
    # Beam's workers report each channel they open and each batch's statistics at INFO: keep their
    # warnings and errors, unless a level is asked for
    workers = options.view_as(WorkerOptions)
    workers.default_sdk_harness_log_level = workers.default_sdk_harness_log_level or "WARNING"
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        create_runner(standard.runner)
    except ValueError as e:
        raise UserError(f"--runner {standard.runner}: {str(e).split(' or the fully')[0]}")
    except ImportError as e:
        raise UserError(f"--runner {standard.runner} needs Apache Beam's extras for it ({e}); for Dataflow: "
                        "pip install 'apache-beam[gcp]' of the same version")
    return options


def runner_name(options):
    from apache_beam.options.pipeline_options import StandardOptions
    return str(options.view_as(StandardOptions).runner).rsplit(".", 1)[-1]


def local_processes(options):
    """How many worker processes a local runner starts that each load the models, or None for a
    runner elsewhere. 0 means the workers are threads of this process (FnApiRunner in memory, or
    multi_threading: RunInference shares one model among a process's threads)."""
    from apache_beam.options.pipeline_options import DirectOptions
    if runner_name(options) not in LOCAL_RUNNERS:
        return None
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode != "multi_processing":
        return 0
    return direct.direct_num_workers or os.cpu_count()


def _local_workers():
    """The Python processes of Beam's local workers started by this process."""
    import psutil
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name().startswith("python") and "sdk_worker_main" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:                # ended meanwhile
            pass
    return found


class WorkerLost(Exception):
    """A local worker process ended while passages were left: Beam's local runner would wait for it
    for ever."""


def _raise_worker_lost(signum, frame):
    raise WorkerLost()


class _Progress:
    """A progress bar per model, moved by the records that appear on storage (wherever the workers
    run), looked at by a thread of this process. It also watches the local
    worker processes: when one ends while passages are left (killed, out of memory), Beam's local
    runner waits for it for ever, so the watcher signals this process's main thread (WorkerLost)."""

    def __init__(self, jobs):
        self.jobs = jobs
        self.stop = threading.Event()
        self.bars = []
        self.workers = {}
        self.lost = None                    # the lost worker's pid

    def __enter__(self):
        for i, (records, _, batches) in enumerate(self.jobs):
            total, done = sum(len(ix) for ix, _ in batches), records.count(batches)
            self.bars.append(tqdm(total=total, initial=done, unit="passage", desc=f"{records.label} scoring",
                                  position=i, postfix=f"{total - done} left",
                                  bar_format="{desc}: {n_fmt}/{total_fmt} passages{postfix} "
                                             "[{elapsed}<{remaining}, {rate_fmt}]"))
        self.previous_handler = signal.signal(signal.SIGUSR1, _raise_worker_lost)
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def update(self):
        """Move the bars; whether passages are left."""
        left = False
        for bar, (records, _, batches) in zip(self.bars, self.jobs):
            done = records.count(batches)
            if done > bar.n:
                bar.set_postfix_str(f"{bar.total - done} left", refresh=False)
                bar.update(done - bar.n)
            left = left or done < bar.total
        return left

    def _lost_worker(self):
        import psutil
        self.workers.update((p.pid, p) for p in _local_workers())
        for pid, proc in self.workers.items():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    continue
            except psutil.NoSuchProcess:
                pass
            return pid
        return None

    def _watch(self):
        interval = PROGRESS_SECONDS["local" if is_local(self.jobs[0][0].folder) else "remote"]
        while not self.stop.wait(interval):
            left = self.update()
            if left:
                lost = self._lost_worker()
                if lost is not None and self.update():      # records of the end of a run are all in
                    self.lost = lost
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                    return

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        signal.signal(signal.SIGUSR1, self.previous_handler)
        self.update()
        for bar in self.bars:
            bar.close()


def score(jobs, options, model_copies=None):
    """Score, in one Beam pipeline, what each job's records lack. jobs: [(ScoreRecords (opened),
    SavedModel dir, batches_by_length's batches)]; their models are loaded by the workers, and the
    ones loaded in this process are freed before this returns."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    todo = [(records, model_dir, records.todo(batches)) for records, model_dir, batches in jobs]
    if not any(t for _, _, t in todo):
        return
    if local_processes(options):
        # worker processes import this package: let them find it wherever they start
        here = str(Path(__file__).resolve().parent.parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    log.info("scoring %s with Apache Beam's %s", " and ".join(r.label for r, _, t in todo if t), runner_name(options))
    progress = _Progress(jobs)
    try:
        with progress:
            with beam.Pipeline(options=options) as p:
                for records, model_dir, elements in todo:
                    if elements:
                        (p | f"{records.label} batches" >> beam.Create(elements)
                           | f"{records.label} scoring" >> RunInference(
                               KeyedModelHandler(ServingHandler(model_dir, model_copies)))
                           | f"{records.label} records" >> beam.ParDo(
                               WriteRecords(records.folder, records.dtype["logits"].shape[0])))
    except (KeyboardInterrupt, WorkerLost) as e:
        for worker in _local_workers():     # the local runner's threads wait for them
            worker.kill()
        kept = ", ".join(f"{records.label} {records.count(batches)} of {sum(len(ix) for ix, _ in batches)}"
                         for records, _, batches in jobs)
        if isinstance(e, WorkerLost):
            raise UserError(f"Beam's worker process {progress.lost} ended part-way; the passages scored are kept "
                            f"({kept}) and the same command scores the rest") from None
        log.info("interrupted with passages recorded in %s (%s): the same command continues from there",
                 split(jobs[0][0].folder)[0], kept)
        raise
    finally:
        release_models()
    missing = [records.label for records, _, batches in jobs if records.count(batches) < sum(len(ix) for ix, _ in batches)]
    if missing:
        raise UserError(f"the pipeline ended without scoring every passage of {' and '.join(missing)}; the same "
                        "command scores the rest")
