"""Editing one model's parameters directly (Model Surgery)."""
