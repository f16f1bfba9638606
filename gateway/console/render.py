"""Templates (Jinja2, shipped in this package) and the invoice as HTML and PDF.

The PDF is made with xhtml2pdf from the very HTML the console shows for an invoice.
xhtml2pdf is pure Python (on ReportLab), so `pip install` is all a fresh machine needs;
WeasyPrint would need the Pango system libraries.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from billing.invoice import Invoice, period_label
from billing.money import format_amount
from gateway.console.config import ConsoleConfig, Party


def _thousands(value: int | float) -> str:
    return f"{value:,}"


def _nanos(value: int) -> str:
    """Exact nano-units as a decimal string without trailing zeros past the cents."""
    text = format_amount(int(value))
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0")
    return f"{whole}.{frac.ljust(2, '0')}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


@functools.cache
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("gateway.console", "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["thousands"] = _thousands
    env.filters["nanos"] = _nanos
    env.filters["percent"] = _percent
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


@dataclass(frozen=True, slots=True)
class InvoiceView:
    """An invoice with what is printed around it: parties, dates and tax lines."""

    invoice: Invoice
    seller: Party
    buyer: Party
    issue_date: date
    due_date: date
    period: str

    @property
    def tax_percent(self) -> str:
        return f"{(Decimal(self.invoice.tax_rate) * 100).normalize():f}%"


def invoice_view(invoice: Invoice, config: ConsoleConfig) -> InvoiceView:
    buyer = config.buyers.get(invoice.tenant_id) or Party(name=invoice.tenant_name)
    if not buyer.name:
        buyer = buyer.model_copy(update={"name": invoice.tenant_name})
    issued = invoice.issued_at.date()
    return InvoiceView(
        invoice=invoice,
        seller=config.seller,
        buyer=buyer,
        issue_date=issued,
        due_date=issued + timedelta(days=config.payment_terms_days),
        period=period_label(invoice),
    )


def invoice_html(view: InvoiceView) -> str:
    """The invoice document: the console's page and the PDF's source."""
    return render("invoice_document.html", view=view, inv=view.invoice)


def invoice_pdf(view: InvoiceView) -> bytes:
    """The invoice as a PDF (blocking: run it in a thread)."""
    from xhtml2pdf import pisa

    out = io.BytesIO()
    status = pisa.CreatePDF(src=invoice_html(view), dest=out, encoding="utf-8")
    if status.err:
        raise RuntimeError(f"the invoice PDF could not be made ({status.err} errors)")
    return out.getvalue()
