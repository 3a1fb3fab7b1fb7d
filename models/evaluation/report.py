"""Result tables, the fidelity/realness trade-off plot and the issue's acceptance targets.

One :class:`Row` per (level, method, alpha), holding dataset means. Methods are named by the
constants below: the student(s) at several alphas, the two ways of mixing the teachers at the same
alphas (their pixel-space linear blend, and network interpolation of their weights: the baselines a
student must beat), the realness and fidelity teachers, and bicubic. Several students compared in
one run are ``student:<name>``.

The targets (:func:`check_targets`, per degradation level and student), with alpha = 1 the
fidelity end and alpha = 0 the realness end:

(a) at each alpha strictly between 0 and 1, the student point is not dominated by the blend curve,
    nor (a') by the interpolation curve. A curve is the polyline through its points in alpha
    order; a student point (NIQE n, PSNR p) is *dominated* when some point of that polyline has
    NIQE ≤ n and PSNR ≥ p (as real and as faithful). The margin is p − max{PSNR of the polyline
    where NIQE ≤ n}, +inf when the polyline is nowhere that real; the target holds when it is ≥ 0.
(b) student alpha = 1 PSNR ≥ fidelity teacher PSNR − 0.2 dB (being better is fine);
(c) student alpha = 0 NIQE ≤ realness teacher NIQE + 0.2, and (c') its PSNR ≥ the realness
    teacher's − 0.2 dB;
(e) along alpha, PSNR rises and NIQE falls towards the realness end: both are non-decreasing in
    alpha (within 0.01 dB / 0.01 NIQE of noise).
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

STUDENT = "student"
BLEND = "blend"
INTERPOLATION = "interpolation"
REALNESS_TEACHER = "realness_teacher"
FIDELITY_TEACHER = "fidelity_teacher"
BICUBIC = "bicubic"

FIDELITY_TOLERANCE_DB = 0.2
REALNESS_TOLERANCE_NIQE = 0.2
REALNESS_TOLERANCE_DB = 0.2
MONOTONE_SLACK = 0.01
_ALPHA_ATOL = 1e-6


@dataclass(frozen=True)
class Row:
    """Dataset-mean metrics of one method (at one alpha, for the student and the blend)."""

    method: str
    alpha: float | None
    psnr: float
    ssim: float
    niqe: float
    lpips: float | None
    seconds: float | None  # mean seconds per image, None when not timed
    level: str = ""  # the degradation level (see levels.py)


def is_student(method: str) -> bool:
    return method == STUDENT or method.startswith(STUDENT + ":")


class TargetCheck(NamedTuple):
    description: str
    value: float
    passed: bool


# -- CSV --------------------------------------------------------------------------------------------
_COLUMNS = [f.name for f in fields(Row)]


def write_csv(rows: Iterable[Row], path: str | os.PathLike[str]) -> Path:
    """One line per row, the :class:`Row` fields as columns, None as an empty cell."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    return out


def read_csv(path: str | os.PathLike[str]) -> list[Row]:
    """The rows :func:`write_csv` wrote (so targets and plots can be redone from a saved run)."""

    def num(text: str) -> float | None:
        return None if text == "" else float(text)

    with Path(path).open(newline="") as handle:
        return [
            Row(
                method=r["method"],
                alpha=num(r["alpha"]),
                psnr=float(r["psnr"]),
                ssim=float(r["ssim"]),
                niqe=float(r["niqe"]),
                lpips=num(r["lpips"]),
                seconds=num(r["seconds"]),
                level=r.get("level") or "",
            )
            for r in csv.DictReader(handle)
        ]


# -- selection --------------------------------------------------------------------------------------
def curve(rows: Iterable[Row], method: str) -> list[Row]:
    """``method``'s rows that have an alpha, sorted by alpha."""
    return sorted((r for r in rows if r.method == method and r.alpha is not None), key=lambda r: float(r.alpha or 0))


def single(rows: Iterable[Row], method: str) -> Row | None:
    """The (first) row of a method that has no alpha: a teacher or bicubic."""
    return next((r for r in rows if r.method == method), None)


def at_alpha(rows: Iterable[Row], method: str, alpha: float) -> Row | None:
    return next((r for r in curve(rows, method) if math.isclose(float(r.alpha or 0), alpha, abs_tol=_ALPHA_ATOL)), None)


# -- targets ----------------------------------------------------------------------------------------
def best_psnr_at_most_niqe(polyline: Sequence[tuple[float, float]], niqe: float) -> float:
    """max PSNR over the points of the (NIQE, PSNR) polyline whose NIQE ≤ ``niqe``; −inf if none."""
    best = -math.inf
    for n, p in polyline:
        if n <= niqe:
            best = max(best, p)
    for (n0, p0), (n1, p1) in itertools.pairwise(polyline):
        if min(n0, n1) < niqe < max(n0, n1):  # the segment crosses NIQE = niqe: its point there counts
            best = max(best, p0 + (p1 - p0) * (niqe - n0) / (n1 - n0))
    return best


def dominance_margin(student: Row, other_curve: Sequence[Row]) -> float:
    """PSNR (dB) by which the student point clears another curve at its own NIQE; ≥ 0 = not dominated."""
    best = best_psnr_at_most_niqe([(r.niqe, r.psnr) for r in other_curve], student.niqe)
    return math.inf if best == -math.inf else student.psnr - best


def _missing(description: str) -> TargetCheck:
    return TargetCheck(f"{description} [missing rows]", math.nan, False)


def students(rows: Iterable[Row]) -> list[str]:
    return list(dict.fromkeys(r.method for r in rows if is_student(r.method)))


def check_targets(rows: Sequence[Row]) -> list[TargetCheck]:
    """(description, measured value, passed) for each target, per student; see the module docstring.

    Expects the rows of one degradation level. A target whose rows are missing fails with NaN.
    """
    checks: list[TargetCheck] = []
    for method in students(rows) or [STUDENT]:
        checks += _student_checks(rows, method)
    return checks


def _student_checks(rows: Sequence[Row], method: str) -> list[TargetCheck]:
    student = curve(rows, method)
    tag = "" if method == STUDENT else f"{method.split(':', 1)[1]} "
    checks: list[TargetCheck] = []
    interior = [r for r in student if 0 < float(r.alpha or 0) < 1]
    for other, name in ((BLEND, "(a) blend"), (INTERPOLATION, "(a') interpolation")):
        other_curve = curve(rows, other)
        if not interior or not other_curve:
            checks.append(_missing(f"{name}: {tag}student curve not dominated"))
        for r in interior if other_curve else []:
            margin = dominance_margin(r, other_curve)
            desc = f"{name}: {tag}student α={r.alpha:g} not dominated (PSNR margin, dB)"
            checks.append(TargetCheck(desc, margin, margin >= 0))

    fidelity, s1 = single(rows, FIDELITY_TEACHER), at_alpha(rows, method, 1.0)
    desc = f"(b) {tag}student α=1 PSNR within {FIDELITY_TOLERANCE_DB} dB of the fidelity teacher (deficit, dB)"
    if fidelity is None or s1 is None:
        checks.append(_missing(desc))
    else:
        deficit = fidelity.psnr - s1.psnr
        checks.append(TargetCheck(desc, deficit, deficit <= FIDELITY_TOLERANCE_DB))

    realness, s0 = single(rows, REALNESS_TEACHER), at_alpha(rows, method, 0.0)
    desc = f"(c) {tag}student α=0 NIQE within {REALNESS_TOLERANCE_NIQE} of the realness teacher (excess NIQE)"
    desc_psnr = f"(c') {tag}student α=0 PSNR within {REALNESS_TOLERANCE_DB} dB of the realness teacher (deficit, dB)"
    if realness is None or s0 is None:
        checks += [_missing(desc), _missing(desc_psnr)]
    else:
        excess, deficit = s0.niqe - realness.niqe, realness.psnr - s0.psnr
        checks.append(TargetCheck(desc, excess, excess <= REALNESS_TOLERANCE_NIQE))
        checks.append(TargetCheck(desc_psnr, deficit, deficit <= REALNESS_TOLERANCE_DB))

    desc = f"(e) {tag}student PSNR and NIQE non-decreasing in α (largest step against, dB or NIQE)"
    if len(student) < 2:
        checks.append(_missing(desc))
    else:
        worst = max(max(a.psnr - b.psnr, a.niqe - b.niqe) for a, b in itertools.pairwise(student))
        checks.append(TargetCheck(desc, max(worst, 0.0), worst <= MONOTONE_SLACK))
    return checks


# -- plot -------------------------------------------------------------------------------------------
def plot_tradeoff(rows: Sequence[Row], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """PNG of PSNR against NIQE, one panel per degradation level: the student, blend and
    interpolation curves (alphas annotated) and the reference points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    levels = list(dict.fromkeys(r.level for r in rows))
    fig = Figure(figsize=(6.5 * len(levels), 5), dpi=110)
    FigureCanvasAgg(fig)  # no pyplot: no global state, safe in threads and without a display
    for i, level in enumerate(levels, 1):
        _plot_level(fig.add_subplot(1, len(levels), i), [r for r in rows if r.level == level],
                    f"{title or 'Fidelity / realness trade-off'}{f' — {level}' if level else ''}")  # fmt: skip
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _plot_level(ax: Any, rows: Sequence[Row], title: str) -> None:
    curves = [(m, "o-", m.replace(STUDENT, "student", 1) + " (α)", (5, 4)) for m in students(rows)]
    curves += [(BLEND, "s--", "teachers' pixel blend (α)", (5, -11)),
               (INTERPOLATION, "^:", "network interpolation (α)", (-30, 6))]  # fmt: skip
    for method, style, label, offset in curves:
        pts = curve(rows, method)
        if not pts:
            continue
        (line,) = ax.plot([r.niqe for r in pts], [r.psnr for r in pts], style, label=label)
        for r in pts:
            ax.annotate(f"α={r.alpha:g}", (r.niqe, r.psnr), textcoords="offset points", xytext=offset, fontsize=7,
                        color=line.get_color())  # fmt: skip
    for method, marker, label in (
        (REALNESS_TEACHER, "*", "realness teacher"),
        (FIDELITY_TEACHER, "D", "fidelity teacher"),
        (BICUBIC, "x", "bicubic"),
    ):
        point = single(rows, method)
        if point is not None:
            ax.plot([point.niqe], [point.psnr], marker, markersize=10, linestyle="none", label=label)
    ax.set_xlabel("NIQE  (← more real)")
    ax.set_ylabel("PSNR, Y channel (dB)  (↑ more faithful)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")


# -- markdown ----------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}f}"


def markdown_table(rows: Iterable[Row]) -> str:
    """A GitHub-markdown table of the rows, for a model card (↑ / ↓ mark the better direction)."""
    lines = [
        "| method | α | PSNR (dB) ↑ | SSIM ↑ | NIQE ↓ | LPIPS ↓ | s / image |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        alpha = "–" if r.alpha is None else f"{r.alpha:g}"
        cells = [
            r.method,
            alpha,
            _fmt(r.psnr, 2),
            _fmt(r.ssim, 4),
            _fmt(r.niqe, 3),
            _fmt(r.lpips, 4),
            _fmt(r.seconds, 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def targets_markdown(checks: Iterable[TargetCheck]) -> str:
    """The target checks as a markdown table (pass/fail per line)."""
    lines = ["| target | value | result |", "| --- | ---: | :---: |"]
    lines += [f"| {c.description} | {_fmt(c.value, 3)} | {'pass' if c.passed else 'FAIL'} |" for c in checks]
    return "\n".join(lines) + "\n"
