"""policy layer; see design.md."""
