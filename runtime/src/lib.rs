//! The `lazarus` binary's library: supervisor, agent and CLI.
//!
//! # Layout
//!
//! | module | owns |
//! | --- | --- |
//! | `cli` | argument definitions and dispatch (`lazarus run`, `checkpoints …`, `storage …`) |
//! | `cli::checkpoints` | `list`, `inspect`, `verify`, `gc` of a job's checkpoints |
//! | `cli::bench` | `storage bench`: write, restore and check a generated checkpoint |
//! | `spec` | the TOML job spec, its validation and the worker plan |
//! | `coordinator` | the checkpoint coordinator: pure decisions, unit-tested without I/O |
//! | `lease` | VIP leases: the authority interface, the in-supervisor table, the holder's self-fencing (pure) |
//! | `procs` | the process table of one job on one host: starts worker processes (primary and standby slots), reports their exits at once, kills them |
//! | `supervisor` | runs a job: placement, handshake, checkpoints, commits, standbys, restarts (job lifecycle) |
//! | `fleet` | where a job's processes run: the local agent or the cluster's agents |
//! | `metrics` | Prometheus metrics: names, the exporter, job and cluster observers |
//! | `placement` | which host runs each primary and standby (pure) |
//! | `cluster` | several hosts: `lazarus supervisor`, `agent`, `submit`, `status`; leases and host loss |
//! | `ha` | supervisor high availability on etcd: election, term, job records |
//! | `vip` | the service VIP on this host: netlink add/remove, gratuitous ARP and unsolicited NA bursts |
//! | `service` | unmodified programs (`kind = "process"`), health checks, notify hooks |
//! | `security` | the cluster CA, certificates with one identity each (role and name), mutual TLS configurations |
//! | `clock` | time: the `Clock` trait, the real and the manual clock; the only reader of `Instant::now` |
//! | `units` | byte sizes (`64MiB`) and durations (`250ms`) for people |
//!
//! Dependency direction: `runtime → worker-sdk → storage`; the wire protocol
//! lives in `lazarus_sdk::protocol`, imported by both sides.

pub mod cli;
pub mod clock;
pub mod cluster;
pub mod coordinator;
pub mod exit_word;
pub mod fleet;
pub mod ha;
pub mod lease;
pub mod metrics;
pub mod placement;
pub mod procs;
pub mod security;
pub mod service;
pub mod spec;
pub mod supervisor;
pub mod units;
pub mod vip;
