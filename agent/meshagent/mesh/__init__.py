"""The mesh between nodes: who is where (meshfile), who is who (identity),
the certificates (ca, certs) and the mutual-TLS hop (hop, inbound)."""
