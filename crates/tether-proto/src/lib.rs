//! tether wire formats: frames, codec and target addresses (sans-IO).
