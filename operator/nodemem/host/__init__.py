"""host layer; see docs/architecture.md#layers."""
