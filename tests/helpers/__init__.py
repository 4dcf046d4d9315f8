"""Test-only helpers (teachers and data that exist to check the framework)."""
