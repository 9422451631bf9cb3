"""Workstation-only training code (needs the training extra: torch)."""
