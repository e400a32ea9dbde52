"""Build a LAMBADA-style data set from the King James Bible.

The text comes from Debian's `bible` tool (packages bible-kjv, bible-kjv-text), which
dumps all 31,102 verses, one per line with its reference. The references are dropped and
the verses joined into running prose.

A passage is a run of whole verses inside one chapter, 40-120 words long, whose last
verse ends a sentence. The passage text ends with that sentence's last word, the target,
without the trailing punctuation, as in LAMBADA. A passage is kept only if the target is
an alphabetic word, not a function word, and occurs earlier in the passage. Passages of
one chapter never share a verse.

The candidate passages of the whole Bible are shuffled with a fixed seed. A passage whose
closing words occur verbatim anywhere else in the Bible (Kings and Chronicles, the Gospels,
refrains) is no evaluation candidate: it could be answered from a memorised verse instead
of from its context. The first candidates in that order give the evaluation set; the next
ones, of any kind, give the calibration set. The training text is every verse that no
evaluation passage uses; the calibration passages stay in it (calibration needs no
held-out text), so evaluation shares no verse with either.

Outputs, next to this file:
    evaluation.jsonl   {"text": ...} per line (committed)
    calibration.jsonl  {"text": ...} per line (committed)
    train.txt          prose, one line per run of verses between evaluation passages
                       (regenerated, not committed)

    python data/kjv_lambada/prepare.py
"""
import argparse
import json
import logging
import random
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

# -----------------------------------------------------------------------------
out_dir = str(Path(__file__).resolve().parent)  # where the jsonl files and train.txt go
seed = 1234  # shuffles the candidate passages; same seed, same files
min_words = 40  # shortest passage, in words
max_words = 120  # longest passage, in words
eval_passages = 1500  # passages in evaluation.jsonl
calib_passages = 300  # passages in calibration.jsonl
leak_ngram = 8  # no evaluation passage ends with this many words found elsewhere in the Bible
# -----------------------------------------------------------------------------

# Function words (modern and King James) that a reader could guess without the context.
STOPWORDS = set("""
a an the and or but nor for so yet if then than that this these those there here
of to in on at by with from into unto upon out up down over under about after before
again against between through among within without off above below also not no yea nay
i me my mine we us our ours you your yours ye thee thou thy thine he him his she her hers
it its they them their theirs who whom whose which what when where why how
is am are was were be been being have has had hath hast having do does did doth dost
done shall shalt will wilt would should may might must can could let
all any some every each both either neither one none such same other own very too
now even also only as like lo behold o oh saith said say says
thereof therein thereon thereto thereby therefore wherefore whereof wherein whereby
""".split())

log = logging.getLogger("prepare")


def dump_verses():
    """Return [(book, chapter, text)] for every verse, in canonical order."""
    if shutil.which("bible") is None:
        raise SystemExit("the `bible` command is missing: run `apt-get install bible-kjv bible-kjv-text`")
    # -f switches pretty-printing off: one verse per line, prefixed by its reference.
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=True).stdout
    verses = []
    for line in out.splitlines():
        m = re.match(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)", line)
        if m:
            verses.append((m.group(1), int(m.group(2)), " ".join(m.group(4).split())))
    log.info("dumped %d verses", len(verses))
    return verses


def group_chapters(verses):
    """Return [[verse text, ...] per chapter] in canonical order."""
    chapters, key = [], None
    for book, chapter, text in verses:
        if (book, chapter) != key:
            chapters.append([])
            key = (book, chapter)
        chapters[-1].append(text)
    return chapters


def words_of(text):
    return re.findall(r"[A-Za-z]+", text)


def passage_ending_at(chapter, end):
    """The passage whose last verse is chapter[end], or None if it is not LAMBADA-like."""
    last = chapter[end]
    m = re.search(r"(?:^|\s)([A-Za-z]+)[.?!]$", last)
    if m is None:
        return None
    target = m.group(1)
    if len(target) < 3 or target.lower() in STOPWORDS:
        return None
    start, n = end, len(last.split())
    while n < min_words and start > 0:
        start -= 1
        n += len(chapter[start].split())
    if not min_words <= n <= max_words:
        return None
    text = " ".join(chapter[start:end + 1])[:-1]  # the one closing [.?!]
    context = {w.lower() for w in words_of(text)[:-1]}
    if target.lower() not in context:
        return None
    return start, text


def passages_of(chapter):
    """Non-overlapping passages (start, end, text) of one chapter, scanned from its first verse."""
    found, free = [], 0
    for end in range(len(chapter)):
        p = passage_ending_at(chapter, end)
        if p is not None and p[0] >= free:
            found.append((p[0], end, p[1]))
            free = end + 1
    return found


def closing_ngram(words):
    return " ".join(w.lower() for w in words[-leak_ngram:])


def write_jsonl(path, texts):
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    log.info("wrote %d passages to %s", len(texts), path)


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    chapters = group_chapters(dump_verses())
    candidates = [(c, *p) for c, chapter in enumerate(chapters) for p in passages_of(chapter)]
    random.Random(seed).shuffle(candidates)
    log.info("%d candidate passages, no two sharing a verse", len(candidates))

    # A passage whose closing words occur anywhere else in the Bible (Kings and Chronicles,
    # the Gospels, refrains) could be answered from a memorised verse, not from its context.
    counts = Counter()
    for chapter in chapters:
        words = words_of(" ".join(chapter))
        counts.update(closing_ngram(words[i - leak_ngram:i]) for i in range(leak_ngram, len(words) + 1))
    unique = [p for p in candidates if counts[closing_ngram(words_of(p[3]))] == 1]
    log.info("%d candidates left after dropping %d whose closing %d words repeat elsewhere",
             len(unique), len(candidates) - len(unique), leak_ngram)
    if len(unique) < eval_passages:
        raise SystemExit(f"only {len(unique)} evaluation candidates, {eval_passages} asked for")
    evaluation = unique[:eval_passages]
    held = {(c, v) for c, start, end, _ in evaluation for v in range(start, end + 1)}
    taken = set(evaluation)
    calibration = [p for p in candidates if p not in taken][:calib_passages]

    # Training text: every verse outside the evaluation passages, one line per unbroken run.
    runs = []
    for c, chapter in enumerate(chapters):
        run = []
        for v, verse in enumerate(chapter + [None]):
            if verse is None or (c, v) in held:
                if run:
                    runs.append(" ".join(run))
                run = []
            else:
                run.append(verse)

    out = Path(out_dir)
    write_jsonl(out / "evaluation.jsonl", [p[3] for p in evaluation])
    write_jsonl(out / "calibration.jsonl", [p[3] for p in calibration])
    (out / "train.txt").write_text("\n".join(runs) + "\n")
    log.info("held out %d of %d verses; wrote %d lines (%d words) to %s", len(held),
             sum(map(len, chapters)), len(runs), sum(len(r.split()) for r in runs), out / "train.txt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ["out_dir", "seed", "min_words", "max_words", "eval_passages", "calib_passages",
                 "leak_ngram"]:
        parser.add_argument("--" + name, type=type(globals()[name]), default=globals()[name])
    globals().update(vars(parser.parse_args()))
    main()
