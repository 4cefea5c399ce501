"""Expert-parallel all-to-all (SCAFFOLD)."""
