"""Backends that execute einpar programs: reference (whole arrays, the oracle)."""
