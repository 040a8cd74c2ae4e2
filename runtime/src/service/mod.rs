//! Unmodified programs as Lazarus workers, and what operators of keepalived
//! or Pacemaker expect around them:
//!
//! | module | owns |
//! | --- | --- |
//! | `spec` | `[operator.process]`, `[operator.health]` and `[notify]` of a job spec |
//! | `process` | `lazarus process-worker`: the worker that runs a program (hot standbys run it too) |
//! | `state_dir` | a program's state directory as a checkpoint part, and back |
//! | `health` | http, tcp and exec checks with rise and fall, run by the agent |
//! | `notify` | notify hooks on role changes, run by the agent in order, bounded in time |

pub mod health;
pub mod notify;
pub mod process;
pub mod spec;
pub mod state_dir;
