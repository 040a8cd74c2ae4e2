//! The Lazarus worker SDK: what a worker author links.
//!
//! A worker binary registers its operator kinds and hands control to the
//! SDK, whose main loop connects to the supervisor, restores state, runs the
//! operator, aligns checkpoint barriers, snapshots without stopping the
//! world, and publishes sink output exactly once. See `docs/sdk.md`.
//!
//! # Layout
//!
//! | module | owns |
//! | --- | --- |
//! | `record` | [`Record`], [`Emitter`], key groups and their owners |
//! | `operator` | the [`Source`], [`Operator`] and [`Sink`] traits, [`Context`], [`Registry`], [`Fatal`] errors |
//! | `state` | [`Snapshot`], [`Restored`], [`KeyedState`] (copy-on-write, incremental) |
//! | `short_string` | [`ShortString`], a string key held inline when short |
//! | `decoded` | state parts held decoded in memory beside their chunks (restores without a read or a decode) |
//! | `align` | barrier alignment across inputs (a pure state machine) |
//! | `in_flight` | barriers found by reading ahead, and the records in flight a checkpoint keeps |
//! | `protocol` | the wire protocol shared with the supervisor (control and data frames) |
//! | `worker` | the worker process main loop: [`run_worker`] |

#![deny(missing_docs)]

mod align;
mod clock;
mod decoded;
mod exit_word;
mod in_flight;
mod link;
mod operator;
pub mod protocol;
mod record;
mod short_string;
mod state;
mod tuning;
mod worker;

pub use operator::{BoxError, Context, Fatal, Operator, Registry, Role, Sink, Source, SourcePoll};
pub use record::{group_owner, key_group, Emitter, Record};
pub use short_string::ShortString;
pub use state::{to_rkyv, Decoded, KeyedState, PartContent, Restored, Revive, Snapshot, StateKey};
pub use tuning::{latency_critical, latency_critical_alone};
pub use worker::run_worker;

/// Checkpoint storage, as the SDK sees it.
pub use lazarus_storage as storage;
/// For sinks that write files: start the disk write of what was written
/// so far, so the fsync at the next barrier has little left to wait for
/// (re-exported from the storage crate).
pub use lazarus_storage::start_writeback;
/// A checkpoint's number (re-exported from the storage crate).
pub use lazarus_storage::CheckpointId;
