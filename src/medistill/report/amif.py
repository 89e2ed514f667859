"""The AMiF experiment's report: accuracy per variant (both closed-question conventions), the share of test
answers outside the training vocabulary, and example test questions with the image and the answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medistill.report.html import HtmlReport, summary_cell, write_section_report
from medistill.report.run import read_metrics

GROUPS = ("open", "closed", "overall")


def variant_rows(metrics: dict[str, Any], prefix: str = "") -> list[list[str]]:
    rows = []
    for name, variant in metrics["variants"].items():
        summary = variant["summary"]
        seconds = variant.get("seconds")
        cells = [summary_cell(summary[f"{prefix}{g}"], percent=True) for g in GROUPS]
        rows.append([name, *cells, ", ".join(variant["overrides"]) or "-",
                     "-" if seconds is None else f"{seconds / 60:.1f}"])
    return rows


def amif_section(report: HtmlReport, run_dir: Path) -> None:
    metrics = read_metrics(run_dir)
    oov = metrics["out_of_vocabulary"]
    report.text(f"Questions: {metrics['questions']}. Answer vocabulary: {metrics['answers']} answers from the training "
                f"questions only. Test questions whose answer is not in it (no model here can answer them): "
                f"{oov['overall']['oov']} of {oov['overall']['n']} overall, {oov['open']['oov']} of {oov['open']['n']} "
                f"open, {oov['closed']['oov']} of {oov['closed']['n']} closed.")
    columns = ["variant", "open %", "closed %", "overall %", "overrides of the full recipe", "minutes"]
    report.heading("Accuracy by the dataset's answer_type")
    report.table(columns, variant_rows(metrics))
    report.heading("Accuracy with closed = the answer is yes / no (the convention of AMiF's released code)")
    report.table(columns, variant_rows(metrics, "yes_no_"))
    report.text("Exact match after normalisation (lower case, collapsed spaces, no final period). Cells are the mean "
                "over seeds with a 95% t-interval when there are several.", note=True)
    rows = metrics.get("examples", {}).get("rows", [])
    if rows:
        report.heading("Example test questions (first variant, first seed)")
        items = []
        for row in rows:
            png = run_dir / "examples" / f"{row['index']:05d}.png"
            verdict = "right" if row["predicted"].strip().lower() == str(row["answer"]).strip().lower() else "wrong"
            others = "; ".join(f"{a} ({s:.2f})" for a, s in row["alternatives"])
            caption = (f"Q ({row['answer_type'].lower()}): {row['question']} | model: {row['predicted']} ({verdict}) | "
                       f"truth: {row['answer']} | next: {others or '-'}")
            if png.is_file():
                items.append((png.read_bytes(), caption))
        report.gallery(items, columns=3)


def write_amif_report(run_dir: str | Path) -> Path:
    return write_section_report(run_dir, "AMiF Med-VQA experiment", amif_section)


def markdown_table(metrics: dict[str, Any], prefix: str = "") -> str:
    """The variants table as Markdown for docs/results.md."""
    lines = ["| variant | open % | closed % | overall % | minutes |", "|---|---|---|---|---|"]
    for row in variant_rows(metrics, prefix):
        lines.append(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[5]} |")
    return "\n".join(lines)
