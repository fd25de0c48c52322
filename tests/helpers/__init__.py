"""Helpers shared by the tests, one module per job (builders, calls, credentials, db,
servers, clock)."""
