//! Shared by the namespace tests of several packages (included with
//! `#[path]`): the test bed and a Lazarus cluster on it.

pub mod cluster;
pub mod netns;
