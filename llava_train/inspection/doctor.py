"""`llava doctor`: validate a whole dataset fast and describe it.

Every sample goes through the exact training path (`data.dataset.prepare`: format, structure, image
headers, template, tokenisation, image-token expansion, truncation) without decoding pixels, in parallel
worker processes; `doctor.decode=true` also decodes every image's pixels there (as training will), which
catches truncated or corrupt pixel data behind an intact header. The report: counts of each error kind
with the first sample ids; histograms of sample lengths and image tokens per image (text, and a PNG);
images per sample; share of text-only samples;
how many samples exceed `data.max_length` (and whether they are truncated or dropped); trained tokens
per epoch; samples whose text spells special tokens (`</s>`, `<|im_end|>`...: count, strings, first
ids). `llava doctor` exits non-zero when any sample has an error.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from llava_train.config import DataConfig
from llava_train.config.jobs import DoctorJobConfig
from llava_train.constants import IGNORE_INDEX
from llava_train.data.dataset import SkipReport, as_sources, prepare
from llava_train.data.encoder import Encoder
from llava_train.data.formats import DataError
from llava_train.data.images import load_rgb
from llava_train.data.sources import Source, apply_weight, count_rows, default_image_root, iter_rows
from llava_train.inspection.preview import load_encoder

CHUNK = 64  # rows per worker task


@dataclass
class Result:
    """What one sample looks like to training (or why it cannot be used)."""

    index: int
    error: Optional[tuple[str, str, str]] = None  # kind, sample id, message
    length: int = 0  # tokens without truncation, images expanded
    image_tokens: list[int] = field(default_factory=list)
    trained: int = 0  # trained tokens after the overflow policy
    overflow: str = ""  # "" | truncated | dropped
    special_text: list[str] = field(default_factory=list)  # special-token strings the message text spells
    sample_id: str = ""


@dataclass
class Report:
    name: str
    samples: int = 0
    errors: SkipReport = field(default_factory=SkipReport)
    lengths: list[int] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)
    images_per_sample: Counter = field(default_factory=Counter)
    over_max: int = 0
    truncated: int = 0
    dropped: int = 0
    trained_tokens: int = 0  # per epoch, source weights applied
    special_text: int = 0  # samples whose text spells special tokens
    special_ids: list[str] = field(default_factory=list)  # the first few of them
    special_strings: Counter = field(default_factory=Counter)  # which strings, in how many samples

    @property
    def ok(self) -> bool:
        return self.errors.total == 0


_WORKER: dict[str, Any] = {}


def _init(full: Encoder, bounded: Encoder, fmt: str, root: str, source: str, decode: bool = False) -> None:
    _WORKER.update(full=full, bounded=bounded, fmt=fmt, root=Path(root), source=source, decode=decode)


def _check(index: int, row: Any) -> Result:
    w = _WORKER
    try:
        conv, sizes, enc = prepare(row, index=index, source=w["source"], fmt=w["fmt"], image_root=w["root"],
                                   encoder=w["full"])
        if w["decode"]:  # every pixel, as training will (truncated data passes the header read)
            for k, ref in enumerate(conv.images):
                load_rgb(ref, w["root"], conv, k)
        res = Result(index, length=len(enc.input_ids), image_tokens=enc.image_tokens, special_text=enc.special_text,
                     sample_id=conv.id)
        bounded = enc
        if res.length > w["bounded"].max_length:
            bounded = w["bounded"].encode(conv, sizes)
            res.overflow = "truncated"
        res.trained = sum(1 for t in bounded.labels if t != IGNORE_INDEX)
        return res
    except DataError as err:
        if err.kind == "too_long":
            return Result(index, overflow="dropped", length=-1)
        sid = err.sample_id if err.sample_id is not None else f"#{index}"
        return Result(index, error=(err.kind, str(sid), str(err)))


def _check_chunk(chunk: list[tuple[int, Any]]) -> list[Result]:
    return [_check(i, row) for i, row in chunk]


def _chunks(rows, size: int):
    chunk = []
    for item in rows:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def check_source(source: Source, cfg: DataConfig, full: Encoder, bounded: Encoder, *, workers: int,
                 progress: bool, report: Report, decode: bool = False) -> None:
    root = str(default_image_root(source, cfg.image_root))
    init = (full, bounded, source.format, root, source.path, decode)
    total = count_rows(source)
    rows = iter_rows(source)  # streamed: HF datasets are memory-mapped, never loaded whole
    results: list[Result] = []
    bar = _progress(total, f"doctor {Path(source.path).name}", progress)
    if workers <= 1 or (total is not None and total < 2 * CHUNK):
        _init(*init)
        for chunk in _chunks(rows, CHUNK):
            results += _check_chunk(chunk)
            bar.update(len(chunk))
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers, initializer=_init, initargs=init) as pool:
            for part in pool.imap(_check_chunk, _chunks(rows, CHUNK)):
                results += part
                bar.update(len(part))
    bar.close()
    weights = Counter(apply_weight(len(results), source.weight, cfg.mix_seed))
    for k, res in enumerate(results):
        report.samples += 1
        if res.error:
            report.errors.record(*res.error)
            continue
        if res.special_text:
            report.special_text += 1
            report.special_strings.update(res.special_text)
            if len(report.special_ids) < 10:
                report.special_ids.append(str(res.sample_id))
        if res.overflow == "dropped":
            report.over_max += 1
            report.dropped += 1
            continue
        report.lengths.append(res.length)
        report.image_tokens += res.image_tokens
        report.images_per_sample[len(res.image_tokens)] += 1
        if res.overflow:
            report.over_max += 1
            report.truncated += 1
        report.trained_tokens += res.trained * weights[k]


def _progress(total: Optional[int], desc: str, enabled: bool):
    from tqdm.auto import tqdm

    small = total is not None and total < 1000
    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled or small, file=sys.stderr)


def histogram(values: list[int], bins: int, width: int = 40) -> list[str]:
    """Text histogram lines: range, count, bar."""
    if not values:
        return ["  (none)"]
    lo, hi = min(values), max(values)
    step = max(1, math.ceil((hi - lo + 1) / bins))
    counts = Counter((v - lo) // step for v in values)
    top = max(counts.values())
    lines = []
    for b in range(math.ceil((hi - lo + 1) / step)):
        n = counts.get(b, 0)
        lines.append(f"  {lo + b * step:>7}-{lo + (b + 1) * step - 1:<7} {n:>7}  {'#' * round(width * n / top)}")
    return lines


def format_report(report: Report, cfg: DataConfig, show_ids: int, bins: int) -> str:
    lines = [f"== {report.name}: {report.samples} sample(s)"]
    usable = len(report.lengths)
    if report.errors.total:
        lines.append(f"ERRORS: {report.errors.total} sample(s) cannot be used")
        for kind, n in report.errors.counts.most_common():
            ids = ", ".join(report.errors.ids[kind][:show_ids])
            lines.append(f"  {kind:<22} {n:>6}  first ids: {ids}")
            lines.append(f"  {'':<22} {'':>6}  e.g. {report.errors.examples[kind][0]}")
    else:
        lines.append("errors: none")
    text_only = report.images_per_sample.get(0, 0)
    lines.append(f"usable samples: {usable}; text-only: {text_only} ({text_only / max(usable, 1):.1%})")
    lines.append("images per sample: " + ", ".join(f"{k}: {n}" for k, n in sorted(report.images_per_sample.items())))
    lines.append(f"over data.max_length={cfg.max_length}: {report.over_max} (truncated by dropping turns: "
                 f"{report.truncated}, dropped: {report.dropped}; data.overflow={cfg.overflow})")
    lines.append(f"trained tokens per epoch: {report.trained_tokens:,}")
    if report.special_text:
        mode = getattr(cfg.special_tokens_in_text, "value", cfg.special_tokens_in_text)
        how = ("tokenised as plain text" if mode == "text" else
               "PARSED as control tokens: data can end a sequence or forge a turn")
        strings = ", ".join(f"{t!r} x{n}" for t, n in report.special_strings.most_common())
        lines.append(f"special-token text: {report.special_text} sample(s) spell special tokens ({strings}); "
                     f"{how} (data.special_tokens_in_text={mode}); first ids: {', '.join(report.special_ids)}")
    else:
        lines.append("special-token text: none")
    if report.lengths:
        lens = sorted(report.lengths)
        lines.append(f"sample length (tokens, images expanded): min {lens[0]}, median {lens[len(lens) // 2]}, "
                     f"max {lens[-1]}")
    lines += histogram(report.lengths, bins)
    lines.append("image tokens per image:")
    lines += histogram(report.image_tokens, bins)
    return "\n".join(lines)


def plot(reports: list[Report], path: Path, bins: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 2, figsize=(10, 3.2 * len(reports)), squeeze=False)
    for row, report in zip(axes, reports):
        row[0].hist(report.lengths or [0], bins=bins, color="#4477aa")
        row[0].set_title(f"{report.name}: sample length (tokens)")
        row[1].hist(report.image_tokens or [0], bins=bins, color="#cc6677")
        row[1].set_title(f"{report.name}: image tokens per image")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def doctor(cfg: DoctorJobConfig, output_dir: str, out: Optional[TextIO] = None) -> list[Report]:
    """Check `data.train_path`/`data.sources` (and `data.eval_path`); print and plot the report."""
    out = out or sys.stdout
    d = cfg.doctor
    _, bounded = load_encoder(cfg.model, cfg.data)
    full = Encoder(bounded.tok, bounded.family, bounded.geometry, max_length=sys.maxsize,
                   overflow="drop_turns", last_turn_only=cfg.data.train_last_turn_only,
                   special_tokens_in_text=cfg.data.special_tokens_in_text, image_placement=cfg.data.image_placement)
    workers = d.workers or os.cpu_count() or 1
    splits = [("train", cfg.data.train_path)]
    if d.include_eval and cfg.data.eval_path:
        splits.append(("eval", cfg.data.eval_path))
    reports = []
    for name, path in splits:
        report = Report(name)
        for source in as_sources(path, cfg.data):
            check_source(source, cfg.data, full, bounded, workers=workers, progress=d.progress, report=report,
                         decode=d.decode)
        reports.append(report)
        print(format_report(report, cfg.data, d.show_ids, d.bins), file=out)
    png = Path(d.plot) if d.plot else Path(output_dir) / "doctor.png"
    plot(reports, png, d.bins)
    bad = sum(r.errors.total for r in reports)
    print(f"histograms: {png}", file=out)
    print(f"doctor: {'FAILED, ' + str(bad) + ' bad sample(s)' if bad else 'OK'}", file=out)
    return reports
