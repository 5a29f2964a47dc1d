"""api layer; see design.md."""
