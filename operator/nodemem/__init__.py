"""nodemem: node memory and OOM policy for Kubernetes."""
