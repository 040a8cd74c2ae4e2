//! The Lazarus worker SDK: what a worker author links.
//!
//! It will hold the Operator/Source/Sink traits, typed and keyed state, and
//! the worker process main loop (barriers, snapshot, restore, heartbeats);
//! see DESIGN.md. Today it re-exports the storage types a worker's state is
//! made of, so worker code can already be written against one crate.
//!
//! ```
//! use lazarus_sdk::storage::{CheckpointId, WorkerId};
//! let worker = WorkerId::new("counter-0").expect("valid name");
//! assert_eq!(CheckpointId(1).next(), CheckpointId(2));
//! assert_eq!(worker.as_str(), "counter-0");
//! ```

#![deny(missing_docs)]

/// Checkpoint storage, as the SDK sees it.
pub use lazarus_storage as storage;
