//! tether agent library: connector, dial policy, local dialing.
pub mod dial;
pub mod policy;
