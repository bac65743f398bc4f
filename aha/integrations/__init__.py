"""Integrations of AHA models with serving engines (each imports its engine only when used)."""
