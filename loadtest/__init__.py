"""Load tests: locust users that behave like tenants' apps, scenarios and reconciliation."""
