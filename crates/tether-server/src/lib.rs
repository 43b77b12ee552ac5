//! tether server library: accept, authenticate, registry, forwards, admin.
