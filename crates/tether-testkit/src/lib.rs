//! test helpers: throwaway PKI, echo and sink servers, in-memory transports.
