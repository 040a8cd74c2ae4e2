//! Savepoints and rescaling of running cluster jobs (the supervisor side of
//! `lazarus savepoint` and `lazarus rescale`).
//!
//! A savepoint pins a committed checkpoint by name in the store
//! (`lazarus_storage::Savepoint`). Without `--stop` it is the first
//! checkpoint to commit after the request (it holds everything acknowledged
//! before it); with `--stop` the job takes a final checkpoint and stops,
//! and the newest committed checkpoint is pinned: nothing after it was
//! committed, so starting `--from` it is exactly-once.
//!
//! A rescale is a stop with a savepoint, then the same submission started
//! again `--from` it with one more `--parallelism OPERATOR=N` override; each
//! new instance restores the key groups it now owns from whichever old
//! instances wrote them (the worker SDK's restore).

use std::time::Duration;

use anyhow::Context as _;
use lazarus_storage::{CheckpointId, CheckpointStore, JobId, Savepoint};
use tokio_util::task::TaskTracker;

use crate::cluster::server::{prepare, start_job, Prepared, ServerOptions};
use crate::cluster::state::Cluster;
use crate::supervisor::controller::JobStateKind;
use crate::supervisor::StopRequest;

/// How long a savepoint waits for its checkpoint, or a stop for the job to end.
const WAIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(20);

/// Takes a savepoint of running job `job`; returns its name (by default
/// `<prefix>-<checkpoint>`) and checkpoint.
pub async fn take_savepoint(
    cluster: &Cluster,
    job: &JobId,
    name: Option<String>,
    prefix: &str,
    stop: bool,
) -> anyhow::Result<(String, CheckpointId)> {
    if let Some(n) = &name {
        Savepoint::check_name(n)?;
    }
    let (status, store_url) = {
        let c = cluster.lock();
        let entry = c.jobs.get(job).with_context(|| format!("no job {job}"))?;
        if entry.ended() {
            anyhow::bail!("job {job} is not running");
        }
        let store_url = entry
            .submission
            .as_ref()
            .map(|s| s.1.clone())
            .with_context(|| format!("job {job} has no store on record"))?;
        if stop {
            let _ = entry.stop.send(StopRequest::StopWithCheckpoint);
        }
        (entry.status.clone(), store_url)
    };
    let js = CheckpointStore::open(&store_url)
        .with_context(|| format!("opening the store {store_url}"))?
        .job(job.clone());
    let read = || status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let started = crate::clock::tokio_now();
    let checkpoint = if stop {
        // Until the job has ended and its task has let go of its workers
        // and VIPs (a rescale starts the same workers again).
        loop {
            let st = read();
            let done = st.state.ended()
                && cluster
                    .lock()
                    .jobs
                    .get(job)
                    .is_none_or(|e| e.task.as_ref().is_none_or(|t| t.is_finished()));
            if done {
                if st.state == JobStateKind::Failed {
                    anyhow::bail!(
                        "job {job} failed while stopping ({}); no savepoint taken",
                        st.failure.unwrap_or_default()
                    );
                }
                break;
            }
            if started.elapsed() > WAIT {
                anyhow::bail!("job {job} did not stop within {WAIT:?}; no savepoint taken");
            }
            tokio::time::sleep(POLL).await;
        }
        js.latest()
            .await
            .with_context(|| format!("job {job} stopped with no committed checkpoint"))?
            .checkpoint
    } else {
        let before = read().last_checkpoint;
        loop {
            let st = read();
            if let Some(n) = st.last_checkpoint.filter(|n| Some(*n) > before) {
                break CheckpointId(n);
            }
            if st.state.ended() {
                anyhow::bail!("job {job} ended before a checkpoint committed; no savepoint taken");
            }
            if started.elapsed() > WAIT {
                anyhow::bail!(
                    "no checkpoint of job {job} committed within {WAIT:?} (does it take periodic checkpoints?); no savepoint taken"
                );
            }
            tokio::time::sleep(POLL).await;
        }
    };
    let name = name.unwrap_or_else(|| format!("{prefix}-{}", checkpoint.0));
    js.create_savepoint(&name, checkpoint).await?;
    tracing::info!(%job, %name, %checkpoint, stop, "savepoint taken");
    Ok((name, checkpoint))
}

/// `lazarus savepoint`: the reply.
pub async fn take(
    cluster: &Cluster,
    job: &JobId,
    name: Option<String>,
    stop: bool,
) -> anyhow::Result<String> {
    let (name, checkpoint) = take_savepoint(cluster, job, name, "savepoint", stop).await?;
    Ok(if stop {
        format!("job {job} stopped at savepoint {name} (checkpoint {checkpoint})")
    } else {
        format!("savepoint {name} of job {job} at checkpoint {checkpoint}")
    })
}

/// A checked rescale, ready to carry out.
pub(crate) struct RescalePlan {
    /// The job as it will run again (its `from` is set once the savepoint
    /// is taken).
    pub next: Prepared,
    /// The operators rescaled (the one asked for and those chained to it by
    /// `forward` edges).
    pub group: Vec<String>,
    /// Their parallelism now.
    pub current: u32,
    /// Their parallelism after.
    pub parallelism: u32,
}

/// Checks a rescale of running job `job` against the plan it would make:
/// everything the new plan would refuse is refused before the job is
/// touched.
pub(crate) fn plan_rescale(
    cluster: &Cluster,
    opts: &ServerOptions,
    job: &JobId,
    operator: &str,
    parallelism: u32,
    added_vips: &[String],
) -> anyhow::Result<RescalePlan> {
    let mut sub = {
        let c = cluster.lock();
        let entry = c.jobs.get(job).with_context(|| format!("no job {job}"))?;
        if entry.ended() {
            anyhow::bail!("job {job} is not running");
        }
        entry
            .submission
            .as_ref()
            .map(|s| s.0.clone())
            .with_context(|| format!("job {job} has no submission on record"))?
    };
    let now = prepare(sub.clone(), opts)?;
    let Some(current) = now
        .spec
        .operators
        .iter()
        .find(|o| o.name == operator)
        .map(|o| o.parallelism)
    else {
        let names: Vec<&str> = now.spec.operators.iter().map(|o| o.name.as_str()).collect();
        anyhow::bail!(
            "job {job} has no operator {operator:?} (operators: {})",
            names.join(", ")
        );
    };
    if current == parallelism {
        anyhow::bail!("operator {operator} of job {job} already has parallelism {parallelism}");
    }
    // Operators chained by `forward` edges keep equal parallelism: they
    // are rescaled together.
    let group = now.spec.forward_group(operator);
    for op in &group {
        sub.parallelism.push(format!("{op}={parallelism}"));
    }
    // One VIP per instance: a scale-down drops the last ones, a scale-up
    // takes the VIPs given for the added instances.
    let o = now
        .spec
        .operators
        .iter()
        .find(|o| o.name == operator)
        .expect("found above");
    let per_instance: Vec<String> = o.vips.iter().chain(o.vips6.iter()).cloned().collect();
    if !added_vips.is_empty() && per_instance.is_empty() {
        anyhow::bail!("operator {operator} of job {job} has no per-instance VIPs (vips = [...]): --vip does not apply");
    }
    if !per_instance.is_empty() {
        let keep = per_instance.len().min(parallelism as usize);
        let mut next: Vec<String> = per_instance[..keep].to_vec();
        next.extend(added_vips.iter().cloned());
        if next.len() < parallelism as usize && per_instance.len() >= current as usize {
            anyhow::bail!(
                "operator {operator} of job {job} serves one VIP per instance: give --vip for each of the {} added instances",
                parallelism as usize - keep
            );
        }
        sub.vips.push(format!("{operator}={}", next.join(",")));
    }
    let next = prepare(sub, opts).with_context(|| format!("rescaling job {job}"))?;
    Ok(RescalePlan {
        next,
        group,
        current,
        parallelism,
    })
}

/// Stops the job with a savepoint for `plan`; returns the job to start
/// (from the savepoint) and the reply.
pub(crate) async fn stop_for_rescale(
    cluster: &Cluster,
    job: &JobId,
    plan: RescalePlan,
) -> anyhow::Result<(Prepared, String)> {
    let RescalePlan {
        mut next,
        group,
        current,
        parallelism,
    } = plan;
    let prefix = format!("rescale-{}-{parallelism}", group[0]);
    let (name, checkpoint) = take_savepoint(cluster, job, None, &prefix, true).await?;
    next.from = Some(name.clone());
    Ok((
        next,
        format!(
            "job {job}: {} rescaled from {current} to {parallelism} instances, from savepoint {name} (checkpoint {checkpoint})",
            group.join(", ")
        ),
    ))
}

/// `lazarus rescale` on a single supervisor: stop `job` with a savepoint
/// and start it again from it with `operator` at `parallelism`.
pub async fn rescale(
    cluster: &Cluster,
    opts: &ServerOptions,
    jobs: &TaskTracker,
    job: &JobId,
    operator: &str,
    parallelism: u32,
    vips: &[String],
) -> anyhow::Result<String> {
    let plan = plan_rescale(cluster, opts, job, operator, parallelism, vips)?;
    let (next, reply) = stop_for_rescale(cluster, job, plan).await?;
    let from = next.from.clone().unwrap_or_default();
    start_job(next, cluster, opts, jobs, None).with_context(|| {
        format!("job {job} stopped at savepoint {from} but did not start again; submit it with --from {from}")
    })?;
    Ok(reply)
}
