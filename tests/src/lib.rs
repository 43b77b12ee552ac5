//! Whole-system tests for tether: helpers shared by the test files.
