//! Shared by the namespace tests of several packages (included with
//! `#[path]`): the test bed and a Lazarus cluster on it.
// Tests measure wall time; the clock rule is for the runtime's decisions.
#![allow(clippy::disallowed_methods)]

pub mod cluster;
pub mod netns;
