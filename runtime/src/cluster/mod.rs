//! Several hosts: `lazarus supervisor`, `lazarus agent`, `lazarus submit`
//! and `lazarus status`.
//!
//! | module | owns |
//! | --- | --- |
//! | `wire` | agent, client and supervisor messages |
//! | `state` | the supervisor's view of hosts, jobs and VIP leases (one lock) |
//! | `server` | `lazarus supervisor`: accepts agents and clients, heartbeats, host loss, leases, jobs |
//! | `leader` | with `--etcd`: take over etcd's jobs when elected, step down when leadership cannot be proven, send agents and clients to the leader |
//! | `allow` | the agent's allow-lists: worker binaries only from configured directories, VIPs only within configured prefixes |
//! | `agent` | `lazarus agent`: runs workers for the supervisor, holds VIPs under leases, fences itself |
//! | `client` | `lazarus submit` and `lazarus status` |
//! | `config` | the supervisor's `--config` file |
//! | `transport` | the control port's connections: mutual TLS with identities, or plain TCP for test setups |
//! | `etcd_vips` | HA clusters: the agent's VIP leases in etcd, under its own etcd lease |
//! | `vip_holder` | one VIP on the agent: lease requests, add/remove, bursts, self-fencing (pure) |
//! | `fleet` | a job's processes and VIPs on the agents (the supervisor's `Fleet`) |
//!
//! A job on the cluster runs the same [`crate::supervisor`] as `lazarus
//! run`, with a [`crate::fleet::Fleet`] that reaches the agents through
//! [`state::ClusterState`].

pub mod agent;
pub mod allow;
pub mod client;
pub mod config;
pub mod etcd_vips;
pub mod fleet;
pub mod leader;
pub mod savepoint;
pub mod server;
pub mod state;
pub mod transport;
pub mod vip_holder;
pub mod wire;
