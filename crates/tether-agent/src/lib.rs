//! tether agent library: connector, dial policy, local dialing.
