//! shared plumbing: TLS and identity, PKI, config loading, shutdown, backoff, telemetry.
