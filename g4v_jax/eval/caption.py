"""Zero-shot video captioning on MSR-VTT (paper Table 2: BLEU-4 and METEOR) with the coco-caption protocol.

    python -m g4v_jax.eval.caption --ckpt DIR --data msrvtt_test.jsonl --out reports/msrvtt_caption \\
        [--instruction "Describe the video in one sentence."] [--max-new-tokens 64] [--batch-size 8] [key=value ...]

Data (JSONL, one video per line; ``video`` relative to the file; ``id`` defaults to the line number)::

    {"id": "video7010", "video": "videos/video7010.mp4", "captions": ["a man is singing", "a man sings on stage"]}

``from_msrvtt`` (``python -m g4v_jax.eval.caption convert MSRVTT_JSON VIDEO_DIR OUT.jsonl [--split test]
[--no-check-files]``) writes this layout from the official annotation file (``videodatainfo.json`` or
``test_videodatainfo.json``: ``videos`` [{"video_id", "split", ...}] and ``sentences`` [{"video_id", "caption",
"sen_id"}]): the captions of each video of the split (``--split all``: every video), in file order.

The model captions every video (video turn, then ``INSTRUCTION``) in jitted greedy batches through
``g4v_jax.inference.answer_requests``; the caption is scored as generated (not cut to its first sentence).

Metrics (``score_captions``, a pure function of {id: caption} and {id: [references]}; definitions in ``METRICS`` and
in every report), all on the 0-1 scale of the paper's Table 2 (GPT4Video: BLEU-4 0.587, METEOR 0.391):

- ``bleu4``, ``meteor``: the coco-caption protocol of ``pycocoevalcap`` (the numbers video-captioning papers report).
  Both need Java: they are refused with an install hint when ``java`` is not on PATH.
- ``bleu4_sacrebleu``: corpus BLEU-4 by sacrebleu on the untokenised text, with its signature; needs no Java, and is
  not comparable with ``bleu4`` (other tokenisation and smoothing).
- Videos the model could not caption (unreadable video, prompt too long) are counted as ``unanswered`` and scored as
  the empty caption, so they lower the scores instead of silently leaving the test set.

Report: ``OUT/report.json`` (checkpoint, data, data_sha256, samples, instruction, generation, metric definitions,
metrics, model errors, per-video records with prediction, references and sentence-level scores) and ``OUT/report.md``
with ``| Method | N | BLEU-4 | METEOR | BLEU-4 (sacrebleu) |``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import g4v_jax
from g4v_jax.data.io import find_video, read_records, record_id, resolve_video_path, sha256_of, write_jsonl
from g4v_jax.data.template import SYSTEM_PROMPT
from g4v_jax.data.tokenizer import load_tokenizer
from g4v_jax.eval.qa import QAItem, answer_items
from g4v_jax.eval.report import data_line, markdown_table as markdown_table_of, write_report as write_report_files
from g4v_jax.inference import SamplingConfig

_log = logging.getLogger(__name__)

INSTRUCTION = "Describe the video in one sentence."

METRICS = {
    "bleu4": "coco-caption protocol (pycocoevalcap): prediction and references lowercased and tokenised by the "
             "Stanford PTB tokenizer (CoreNLP 3.4.1), punctuation tokens removed; corpus BLEU-4 (Papineni et al. "
             "2002): clipped 1..4-gram matches against all references of each video and candidate n-gram counts are "
             "summed over all videos, their ratios' geometric mean times the brevity penalty exp(1 - r/c) when c < r "
             "(c: summed prediction lengths, r: summed lengths of the reference closest in length to each "
             "prediction); 0-1 scale as in the paper's Table 2 (GPT4Video 0.587)",
    "meteor": "coco-caption protocol (pycocoevalcap): METEOR 1.5 (Banerjee & Lavie 2005; `-l en -norm`: exact, stem, "
              "synonym and paraphrase matches) on the same PTB-tokenised text, the corpus score METEOR computes from "
              "the statistics of all videos together (not the mean of per-video scores); 0-1 scale as in the "
              "paper's Table 2 (GPT4Video 0.391)",
    "bleu": "coco-caption corpus BLEU-1..4 (as bleu4, for n = 1..4), 0-1 scale",
    "bleu4_sacrebleu": "sacrebleu corpus BLEU-4 on the untokenised text (its own 13a tokenizer, lowercased, "
                       "punctuation kept as tokens, exp smoothing, all references of each video), divided by 100 to "
                       "the 0-1 scale; needs no Java; comparable only with sacrebleu numbers of the same "
                       "sacrebleu_signature, not with bleu4",
    "unanswered": "videos the model could not caption (model errors); each is scored as the empty caption (no "
                  "matches, and its closest reference length still counts towards the brevity penalty), so it "
                  "lowers every metric",
    "records": "per video: bleu4 is coco's smoothed sentence-level BLEU-4 and meteor METEOR's segment score, for "
               "inspection only (the corpus metrics above are not their means)",
}

JAVA_HINT = ("install a Java runtime (8 or newer), e.g. `apt-get install openjdk-17-jre-headless` on Debian/Ubuntu "
             "or `conda install -c conda-forge openjdk`, and put `java` on PATH")


class CaptionError(ValueError):
    """A caption file (or MSR-VTT annotation file) that does not fit the schema; names file:line."""


class JavaNotFoundError(RuntimeError):
    """The coco-caption scorers need Java and there is none on PATH."""


class ScorerError(RuntimeError):
    """A Java scorer (PTB tokenizer or METEOR) failed."""


@dataclasses.dataclass(frozen=True)
class CaptionItem:
    id: str
    video: str  # resolved path
    captions: tuple[str, ...]  # the references


def read_captions(path: str | os.PathLike) -> list[CaptionItem]:
    """Every video of a caption JSONL file (module docstring), validated; ``CaptionError`` names ``file:line``."""
    base = Path(path).parent

    def parse(raw: Mapping, where: str, lineno: int) -> CaptionItem:
        video, refs = raw.get("video"), raw.get("captions")
        if not isinstance(video, str) or not video.strip():
            raise CaptionError(f"{where}: video must be a non-empty path")
        if not isinstance(refs, list) or not refs:
            raise CaptionError(f"{where}: captions must be a non-empty list of reference captions")
        for k, ref in enumerate(refs):
            if not isinstance(ref, str) or not ref.strip():
                raise CaptionError(f"{where}: captions[{k}] must be a non-empty string, got {ref!r}")
        return CaptionItem(record_id(raw, lineno, where, CaptionError), resolve_video_path(video, base),
                           tuple(r.strip() for r in refs))

    return read_records(path, parse, error=CaptionError, kind="caption", noun="videos",
                        keys=("id", "video", "captions"))


# --------------------------------------------------------------------------------------------------------------------
# Scoring: the coco-caption protocol (Java) and sacrebleu
# --------------------------------------------------------------------------------------------------------------------


def require_java() -> str:
    """The path of ``java``, or ``JavaNotFoundError`` saying how to install it."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError("BLEU-4 and METEOR of the coco-caption protocol (pycocoevalcap's PTB tokenizer and "
                                f"METEOR 1.5) run Java, and no `java` is on PATH: {JAVA_HINT}")
    return java


def clean_text(text: str) -> str:
    """Every run of whitespace (newlines, CR, U+2028 ... included) to one space, and METEOR's field separator
    ``|||`` removed. Java's tokenizer ends a line at a CR or U+2028 where Python's join does not, which would shift
    every later caption onto another video's line; METEOR would read ``|||`` in a reference as a field boundary."""
    return " ".join(text.replace("|||", " ").split())


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """The coco-caption tokenisation of each text: pycocoevalcap's CoreNLP jar with its flags (``-preserveLines
    -lowerCase``) and its punctuation filter, one line per text.

    pycocoevalcap's own ``PTBTokenizer.tokenize`` is not used because it zips Java's output lines with its input
    without checking their number (one caption with a CR silently misaligns all later ones) and writes its temporary
    file into the installed package directory; this runs the same jar and checks that it answered one line per text.
    """
    require_java()
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    lines = [clean_text(t) for t in texts]
    with tempfile.TemporaryDirectory(prefix="g4v_ptb_") as tmp:
        src = Path(tmp) / "captions.txt"
        src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        proc = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", str(src)], capture_output=True)
    if proc.returncode != 0:
        raise ScorerError(f"the PTB tokenizer (java) failed with exit code {proc.returncode}: "
                          f"{proc.stderr.decode(errors='replace')[-2000:]}")
    out = proc.stdout.decode("utf-8").split("\n")
    if out and out[-1] == "":
        out.pop()  # the newline after the last line
    if len(out) != len(lines):
        raise ScorerError(f"the PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS) for line in out]


def _stop_meteor(meteor) -> None:
    proc = meteor.meteor_p
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        pipe.close()


@contextlib.contextmanager
def meteor_scorer() -> Iterator[Any]:
    """A running pycocoevalcap ``Meteor`` (one Java process; starting it takes seconds, so reuse it across
    ``score_captions`` calls), stopped on exit."""
    require_java()
    from pycocoevalcap.meteor.meteor import Meteor

    class _Meteor(Meteor):
        def __del__(self):
            # _stop_meteor stops the process; the inherited __del__ would wait forever on the lock a failed read left
            # held, and fails with an AttributeError when it runs at interpreter exit
            pass

    meteor = _Meteor()
    try:
        yield meteor
    finally:
        _stop_meteor(meteor)


def _meteor(meteor, refs: dict[str, list[str]], preds: dict[str, list[str]]) -> tuple[float, list[float]]:
    try:
        return meteor.compute_score(refs, preds)
    except (ValueError, OSError) as e:  # an empty line from a dead process, or a broken pipe
        proc = meteor.meteor_p
        exited = proc.poll() is not None and not proc.stderr.closed
        detail = proc.stderr.read().decode(errors="replace")[-2000:] if exited else ""
        raise ScorerError(f"METEOR (java) failed: {e} {detail}".strip()) from e


def _check_inputs(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]):
    if not references:
        raise ValueError("score_captions: no references")
    refs: dict[str, list[str]] = {}
    for vid, rs in references.items():
        if isinstance(rs, str) or not isinstance(rs, Sequence) or not rs:
            raise ValueError(f"score_captions: references[{vid!r}] must be a non-empty list of strings")
        if not all(isinstance(r, str) and r.strip() for r in rs):
            raise ValueError(f"score_captions: references[{vid!r}] has an empty or non-string reference")
        if str(vid) in refs:
            raise ValueError(f"score_captions: two reference ids read {str(vid)!r}")
        refs[str(vid)] = [clean_text(r) for r in rs]
    by_id = {str(k): v for k, v in predictions.items()}
    extra = sorted(k for k in by_id if k not in refs)
    if extra:
        raise ValueError(f"score_captions: predictions for ids without references: {extra[:10]}")
    preds, unanswered = {}, 0
    for vid in refs:
        p = by_id.get(vid)
        if p is None:
            unanswered += 1
            p = ""
        elif not isinstance(p, str):
            raise ValueError(f"score_captions: predictions[{vid!r}] must be a string, got {type(p).__name__}")
        preds[vid] = clean_text(p)
    return preds, refs, unanswered


def sacrebleu_bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, str]:
    """(corpus BLEU-4 on the 0-1 scale, sacrebleu signature) as defined in ``METRICS["bleu4_sacrebleu"]``."""
    from sacrebleu.metrics import BLEU

    width = max(len(r) for r in references)
    # sacrebleu takes reference streams; a video with fewer references fills its slots with None (ignored)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(width)]
    bleu = BLEU(lowercase=True)
    return bleu.corpus_score(list(predictions), streams).score / 100.0, str(bleu.get_signature())


def score_captions(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                   meteor=None) -> dict:
    """The metrics of ``METRICS`` for {id: caption} against {id: [reference, ...]}.

    Every id of ``references`` is scored (ids compared and returned as strings); one missing from ``predictions`` (or
    None) is unanswered and scored as the empty caption. ``meteor``: a running scorer from ``meteor_scorer()``
    (default: one started and stopped here).
    Returns {"n", "unanswered", "bleu4", "meteor", "bleu" [BLEU-1..4], "bleu4_sacrebleu", "sacrebleu_signature",
    "per_video": {id: {"bleu4", "meteor"}}}.
    """
    preds, refs, unanswered = _check_inputs(predictions, references)
    require_java()
    ids = list(refs)
    flat = [text for vid in ids for text in [preds[vid], *refs[vid]]]
    tokens = iter(ptb_tokenize(flat))
    res_tok, gts_tok = {}, {}
    for vid in ids:
        res_tok[vid] = [next(tokens)]
        gts_tok[vid] = [next(tokens) for _ in refs[vid]]

    from pycocoevalcap.bleu.bleu import Bleu

    bleu, bleu_per_video = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    if meteor is None:
        with meteor_scorer() as m:
            meteor_corpus, meteor_per_video = _meteor(m, gts_tok, res_tok)
    else:
        meteor_corpus, meteor_per_video = _meteor(meteor, gts_tok, res_tok)
    sacre, signature = sacrebleu_bleu4([preds[v] for v in ids], [refs[v] for v in ids])
    return {"n": len(ids), "unanswered": unanswered, "bleu4": float(bleu[3]), "meteor": float(meteor_corpus),
            "bleu": [float(b) for b in bleu], "bleu4_sacrebleu": sacre, "sacrebleu_signature": signature,
            "per_video": {vid: {"bleu4": float(bleu_per_video[3][k]), "meteor": float(meteor_per_video[k])}
                          for k, vid in enumerate(ids)}}


# --------------------------------------------------------------------------------------------------------------------
# Captioning and the report
# --------------------------------------------------------------------------------------------------------------------


def caption_videos(model, tokenizer, items: Sequence[CaptionItem], *, instruction: str = INSTRUCTION, sampling,
                   batch_size: int = 8, progress: bool = True, system_prompt: str = SYSTEM_PROMPT
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """The model's caption of every video ({id: caption}) and {id: error} for those it could not caption.
    ``system_prompt``: the one the model was trained with (default: the release's)."""
    # QA's runner sends exactly the turns we need (the video, then one human text turn); its answer is unused
    questions = [QAItem(it.id, it.video, instruction, "") for it in items]
    return answer_items(model, tokenizer, questions, sampling=sampling, batch_size=batch_size, progress=progress,
                        system_prompt=system_prompt)


def build_report(*, checkpoint: str, data: str | os.PathLike, items: Sequence[CaptionItem],
                 captions: Mapping[str, str], errors: Mapping[str, str], instruction: str = INSTRUCTION,
                 max_new_tokens: int | None = None) -> dict:
    scores = score_captions(captions, {it.id: list(it.captions) for it in items})
    per_video = scores.pop("per_video")
    records = []
    for it in items:
        rec: dict[str, Any] = {"id": it.id, "video": it.video, "prediction": captions.get(it.id),
                               "references": list(it.captions), **per_video[it.id]}
        if it.id in errors:
            rec["error"] = errors[it.id]
        records.append(rec)
    return {"checkpoint": str(checkpoint), "data": str(data), "data_sha256": sha256_of(data), "samples": len(items),
            "instruction": instruction, "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens},
            "metric_definitions": dict(METRICS), "metrics": scores, "model_errors": dict(errors), "records": records}


def markdown_table(report: Mapping, method: str) -> str:
    m = report["metrics"]
    row = [method, m["n"], f"{m['bleu4']:.3f}", f"{m['meteor']:.3f}", f"{m['bleu4_sacrebleu']:.3f}"]
    return markdown_table_of(["Method", "N", "BLEU-4", "METEOR", "BLEU-4 (sacrebleu)"], [row])


def write_report(report: Mapping, out: str | os.PathLike, method: str) -> str:
    m, gen = report["metrics"], report["generation"]
    return write_report_files(
        report, out, title="Video captioning", table=markdown_table(report, method),
        before=[data_line(report, "videos"), f"Instruction: \"{report['instruction']}\" ({gen['decoding']}, at most "
                f"{gen['max_new_tokens']} new tokens)."],
        after=[f"Unanswered (scored as empty captions): {m['unanswered']}. sacrebleu signature: "
               f"`{m['sacrebleu_signature']}`."])


# --------------------------------------------------------------------------------------------------------------------
# Converter
# --------------------------------------------------------------------------------------------------------------------


def _msrvtt_lists(json_path: Path) -> tuple[list, list]:
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CaptionError(f"{json_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, Mapping):
        raise CaptionError(f"{json_path}: expected an object with 'videos' and 'sentences', got {type(data).__name__}")
    for key in ("videos", "sentences"):
        if not isinstance(data.get(key), list):
            raise CaptionError(f"{json_path}: '{key}' must be a list (the MSR-VTT videodatainfo.json layout)")
    return data["videos"], data["sentences"]


def from_msrvtt(json_path: str | os.PathLike, video_dir: str | os.PathLike, out: str | os.PathLike, *,
                split: str | None = "test", check_files: bool = True) -> int:
    """MSR-VTT ``videodatainfo.json`` / ``test_videodatainfo.json`` -> our caption JSONL; returns the number written.

    Keeps the videos whose ``split`` is ``split`` (None: all), in file order, each with its ``sentences`` captions in
    file order. A ``video_id`` names its file (``video7010`` -> ``VIDEO_DIR/video7010.mp4``, or another of
    ``data.io.VIDEO_EXTENSIONS``; an integer N names ``videoN``); paths are written relative to ``out``'s directory.
    Videos without captions, repeated videos, malformed entries and (``check_files``) videos whose file is missing
    are skipped and counted in the log. ``CaptionError`` if the split has no videos (naming the splits present)."""
    json_path, video_dir, out = Path(json_path), Path(video_dir).resolve(), Path(out)
    videos, sentences = _msrvtt_lists(json_path)
    skipped = collections.Counter()
    captions: dict[str, list[str]] = collections.defaultdict(list)
    for s in sentences:
        vid, text = (s.get("video_id"), s.get("caption")) if isinstance(s, Mapping) else (None, None)
        if vid is None or not isinstance(text, str) or not text.strip():
            skipped["bad_sentence"] += 1
            continue
        captions[str(vid)].append(text.strip())
    wanted = [v for v in videos if isinstance(v, Mapping) and v.get("video_id") not in (None, "")
              and (split is None or v.get("split") == split)]
    if not wanted:
        present = sorted({str(v.get("split")) for v in videos if isinstance(v, Mapping)})
        raise CaptionError(f"{json_path}: no videos in split {split!r} (splits present: {present})")
    out_dir = out.resolve().parent
    lines, seen = [], set()
    for v in wanted:
        vid = v["video_id"]
        key = str(vid)
        if key in seen:
            skipped["repeated_video"] += 1
            continue
        seen.add(key)
        if not captions.get(key):
            skipped["no_captions"] += 1
            continue
        name = f"video{vid}" if isinstance(vid, int) else key
        file = find_video(video_dir, name)
        if file is None:
            if check_files:
                skipped["missing_video_file"] += 1
                continue
            file = video_dir / (name if Path(name).suffix else name + ".mp4")
        lines.append({"id": key, "video": os.path.relpath(file, out_dir), "captions": captions[key]})
    write_jsonl(out, lines)
    if skipped:
        _log.warning("from_msrvtt: skipped %s", dict(skipped))
    return len(lines)


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def _convert_main(argv: Sequence[str]) -> None:
    cp = argparse.ArgumentParser(prog="python -m g4v_jax.eval.caption convert",
                                 description="MSR-VTT videodatainfo.json -> caption JSONL")
    cp.add_argument("input", help="videodatainfo.json or test_videodatainfo.json")
    cp.add_argument("video_dir")
    cp.add_argument("output")
    cp.add_argument("--split", default="test", help="train, validate, test, or all (default: test)")
    cp.add_argument("--no-check-files", action="store_true", help="keep videos whose file is not in VIDEO_DIR")
    a = cp.parse_args(argv)
    try:
        n = from_msrvtt(a.input, a.video_dir, a.output, split=None if a.split == "all" else a.split,
                        check_files=not a.no_check_files)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {n} videos to {a.output}")


def main(argv=None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "convert":
        _convert_main(argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=None, help="default: the checkpoint directory")
    ap.add_argument("--instruction", default=INSTRUCTION)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for the checkpoint")
    args = ap.parse_intermixed_args(argv)
    if not args.instruction.strip():
        ap.error("--instruction must not be empty")
    try:
        require_java()  # before captioning, not after it
        items = read_captions(args.data)
        model = g4v_jax.load(args.ckpt, args.overrides)
        tokenizer = load_tokenizer(args.tokenizer or args.ckpt)
        captions, errors = caption_videos(model, tokenizer, items, instruction=args.instruction,
                                          sampling=SamplingConfig(args.max_new_tokens), batch_size=args.batch_size)
        if errors:
            _log.warning("%d of %d videos could not be captioned (scored as empty captions)", len(errors), len(items))
        report = build_report(checkpoint=args.ckpt, data=args.data, items=items, captions=captions, errors=errors,
                              instruction=args.instruction, max_new_tokens=args.max_new_tokens)
    except (ValueError, FileNotFoundError, JavaNotFoundError, ScorerError) as e:
        sys.exit(f"error: {e}")
    print(write_report(report, args.out, Path(args.ckpt).name))


if __name__ == "__main__":
    main()
