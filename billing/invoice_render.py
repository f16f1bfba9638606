"""An invoice as JSON, CSV (spreadsheets, accounting imports) or a printable HTML page."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from html import escape
from typing import Literal

from billing.invoice import Invoice, InvoiceLine, period_label
from billing.money import format_amount

InvoiceFormat = Literal["json", "csv", "html"]

CSV_COLUMNS = (
    "invoice_number",
    "tenant_id",
    "invoice_month",
    "status",
    "row_type",
    "usage_month",
    "description",
    "model",
    "price_version",
    "token_kind",
    "quantity",
    "unit_price_per_million",
    "amount",
    "currency",
    "exact_amount",
)


def render_invoice(invoice: Invoice, fmt: InvoiceFormat) -> str:
    """The invoice as text in `fmt` ("json", "csv" or "html")."""
    if fmt == "json":
        return json.dumps(invoice.to_dict(), indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        return render_csv(invoice)
    if fmt == "html":
        return render_html(invoice)
    raise ValueError(f"unknown invoice format {fmt!r}; use json, csv or html")


def render_csv(invoice: Invoice) -> str:
    """One row per line, then subtotal, tax and total rows (same columns throughout)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    common = (invoice.number, invoice.tenant_id, invoice.month, invoice.status)
    for line in invoice.lines:
        writer.writerow(
            (
                *common,
                line.kind,
                line.usage_month,
                line.description,
                line.model,
                line.price_version,
                line.token_kind or "",
                line.quantity if line.token_kind else "",
                line.unit_price_per_million,
                str(line.amount),
                invoice.currency,
                format_amount(line.amount_nanos),
            )
        )
    tax_label = f"Tax at {_percent(invoice.tax_rate)}"
    for row_type, description, amount in (
        ("subtotal", "Subtotal", invoice.subtotal),
        ("tax", tax_label, invoice.tax),
        ("total", "Total", invoice.total),
    ):
        writer.writerow(
            (
                *common,
                row_type,
                "",
                description,
                "",
                "",
                "",
                "",
                "",
                str(amount),
                invoice.currency,
                "",
            )
        )
    return out.getvalue()


def _percent(rate: Decimal) -> str:
    return f"{(Decimal(rate) * 100).normalize():f}%"


def _money(amount: Decimal, currency: str) -> str:
    return f"{amount:,} {escape(currency)}"


def _line_row(line: InvoiceLine, currency: str) -> str:
    quantity = f"{line.quantity:,}" if line.token_kind else ""
    unit = line.unit_price_per_million
    return (
        f'<tr class="{escape(line.kind)}">'
        f"<td>{escape(line.description)}</td>"
        f'<td class="num">{quantity}</td>'
        f'<td class="num">{escape(unit)}</td>'
        f'<td class="num">{_money(line.amount, currency)}</td></tr>'
    )


_STYLE = """
  :root { color-scheme: light; }
  body { font: 11pt/1.4 "DejaVu Sans", Arial, sans-serif; color: #111; margin: 2.5em; }
  header { display: flex; justify-content: space-between; align-items: baseline; }
  h1 { font-size: 20pt; margin: 0 0 .2em; }
  .status { font-weight: bold; text-transform: uppercase; letter-spacing: .1em; }
  .status.draft { color: #a33; }
  dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; margin: 1em 0; }
  dt { color: #555; } dd { margin: 0; }
  table { width: 100%; border-collapse: collapse; margin-top: 1em; }
  th, td { padding: .35em .5em; border-bottom: 1px solid #ddd; vertical-align: top; }
  th { text-align: left; border-bottom: 2px solid #333; }
  .num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
  tr.discount td, tr.adjustment td { font-style: italic; }
  tfoot td { border-bottom: none; }
  tfoot tr.total td { font-weight: bold; border-top: 2px solid #333; font-size: 12pt; }
  .note { color: #555; font-size: 9pt; margin-top: 2em; }
  @page { size: A4; margin: 15mm; }
  @media print {
    body { margin: 0; }
    thead { display: table-header-group; }
    tr { page-break-inside: avoid; break-inside: avoid; }
  }
"""


def render_html(invoice: Invoice) -> str:
    """A self-contained printable page (print CSS, no scripts, no external resources)."""
    currency = invoice.currency
    rows = "\n".join(_line_row(line, currency) for line in invoice.lines)
    if not rows:
        rows = '<tr><td colspan="4">No usage in this period.</td></tr>'
    status = "Draft" if invoice.status == "draft" else "Final"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Invoice {escape(invoice.number)}</title>
<style>{_STYLE}</style>
</head>
<body>
<header>
  <h1>Invoice {escape(invoice.number)}</h1>
  <span class="status {escape(invoice.status)}">{status}</span>
</header>
<dl>
  <dt>Tenant</dt><dd>{escape(invoice.tenant_name)} ({escape(invoice.tenant_id)})</dd>
  <dt>Period</dt><dd>{escape(period_label(invoice))}</dd>
  <dt>Currency</dt><dd>{escape(currency)}</dd>
  <dt>Issued</dt><dd>{escape(invoice.issued_at.strftime("%Y-%m-%d %H:%M UTC"))}</dd>
</dl>
<table>
  <thead><tr>
    <th>Description</th><th class="num">Tokens</th>
    <th class="num">Unit price per 1M tokens</th><th class="num">Amount</th>
  </tr></thead>
  <tbody>
{rows}
  </tbody>
  <tfoot>
    <tr class="subtotal"><td colspan="3">Subtotal</td>
      <td class="num">{_money(invoice.subtotal, currency)}</td></tr>
    <tr class="tax"><td colspan="3">Tax at {_percent(invoice.tax_rate)}</td>
      <td class="num">{_money(invoice.tax, currency)}</td></tr>
    <tr class="total"><td colspan="3">Total</td>
      <td class="num">{_money(invoice.total, currency)}</td></tr>
  </tfoot>
</table>
<p class="note">Usage lines are at list price; plan discounts are their own lines. Each
amount is computed exactly from the metered requests and rounded once to the currency's minor
unit. Usage that arrives after a month is finalised appears on a later invoice as
adjustment lines.</p>
</body>
</html>
"""
