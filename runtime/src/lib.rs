//! The `lazarus` binary's library: supervisor, agent and CLI.
//!
//! # Layout
//!
//! | module | owns |
//! | --- | --- |
//! | `cli` | argument definitions and dispatch (`lazarus checkpoints …`, `lazarus storage …`) |
//! | `cli::checkpoints` | `list`, `inspect`, `verify`, `gc` of a job's checkpoints |
//! | `cli::bench` | `storage bench`: write, restore and check a generated checkpoint |
//! | `units` | byte sizes (`64MiB`) and times for people |
//!
//! The supervisor and the agent arrive with the streaming runtime (see
//! DESIGN.md); everything storage-related goes through `lazarus-storage`.

pub mod cli;
pub mod units;
