"""The gateway's database: every table, its migrations and the queries the rest call.

One package owns persistence, SQLite or PostgreSQL alike:

- `schema`: every table (the ledger's, invoices, tenants and keys, stored Responses,
  console users and sessions);
- `migrations`: the Alembic revisions that make that schema (`upgrade(engine)`);
- `engine`: the helpers every query shares (times stored as naive UTC, 15-minute rollup
  buckets, dialect-aware upserts, the SQLite file behind a URL);
- `usage`: the read queries over the ledger (rollup sums, raw rows), with typed results;
- `invoices`: finalised invoices and what they charged;
- `keys`, `responses`, `console_users`: the rows behind the admin API's tenants and keys,
  stored OpenAI Responses, and the web console's users and sessions.

`billing.ledger` writes the ledger (its batch writer keeps its own SQL, tuned per dialect).
`gateway.keystore`, `gateway.response_store` and `gateway.console.users` keep their domain
logic (key minting, JSON, password hashing) and call the functions here for every row.
"""
