"""Kernel tuning: profiles (TOML), read-only plans, apply through a crash-safe journal, exact rollback."""
