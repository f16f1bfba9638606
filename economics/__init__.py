"""The MaaS economics simulator: scenario files, a synthetic month through the real gateway
on a compressed clock, margin reports, charts and what-if comparisons.

A client of the gateway (it drives it over a loopback socket and reports from the ledger),
not part of its HTTP surface: it lives beside `loadtest/`, not inside `gateway/`.

Modules: `scenario` (the YAML model), `traffic` (the planned requests), `runner` (the
compressed-clock run), `report` (the margin report), `charts` (SVG), `simulate` (a month
end to end), `whatif` (two configurations side by side), `cli` (the subcommands).
"""
