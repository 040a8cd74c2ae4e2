//! `lazarus checkpoints list|inspect|verify|gc|savepoint|delete-savepoint`.

use std::process::ExitCode;

use anyhow::{bail, Context};
use lazarus_storage::{
    CheckpointEntry, CheckpointId, CheckpointStatus, CheckpointStore, JobId, JobStore,
};

use super::JobArgs;
use crate::units::{format_bytes, format_unix_ms};

/// Lists the job's manifests, failing with a helpful message if it has none.
async fn entries(
    store: &CheckpointStore,
    job: &JobId,
) -> anyhow::Result<(JobStore, Vec<CheckpointEntry>)> {
    let js = store.job(job.clone());
    let entries = js
        .list()
        .await
        .with_context(|| format!("listing checkpoints of job {job} in {}", store.url()))?;
    if entries.is_empty() {
        let jobs = store.jobs().await.unwrap_or_default();
        let known = if jobs.is_empty() {
            "the store holds no jobs".to_string()
        } else {
            format!(
                "jobs in this store: {}",
                jobs.iter()
                    .map(|j| j.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        bail!("job {job} has no checkpoints in {} ({known})", store.url());
    }
    Ok((js, entries))
}

fn status_word(entry: &CheckpointEntry) -> String {
    match &entry.status {
        CheckpointStatus::Committed(_) => "committed".into(),
        CheckpointStatus::Fenced { by, .. } => format!("fenced (epoch {by} came first)"),
        CheckpointStatus::Corrupt(reason) => format!("CORRUPT manifest: {reason}"),
    }
}

/// `checkpoints list`
pub async fn list(args: &JobArgs) -> anyhow::Result<ExitCode> {
    let (store, job) = args.open()?;
    let (js, entries) = entries(&store, &job).await?;
    let savepoints = js
        .savepoints()
        .await
        .with_context(|| format!("listing savepoints of job {job}"))?;
    let pinned = |id: CheckpointId| {
        let names: Vec<&str> = savepoints
            .iter()
            .filter(|s| s.checkpoint == id)
            .map(|s| s.name.as_str())
            .collect();
        if names.is_empty() {
            String::new()
        } else {
            format!("  savepoint {}", names.join(", "))
        }
    };
    println!(
        "{:>8}  {:>6}  {:<23}  {:>10}  {:>10}  {:>7}  STATUS",
        "ID", "EPOCH", "CREATED (UTC)", "STATE", "STORED", "WORKERS"
    );
    for e in &entries {
        match e.manifest() {
            Some(m) => println!(
                "{:>8}  {:>6}  {:<23}  {:>10}  {:>10}  {:>7}  {}",
                e.id,
                m.epoch,
                format_unix_ms(m.created_at_ms),
                format_bytes(m.state_bytes()),
                format_bytes(m.stored_bytes()),
                m.workers.len(),
                status_word(e) + &pinned(e.id)
            ),
            None => println!(
                "{:>8}  {:>6}  {:<23}  {:>10}  {:>10}  {:>7}  {}",
                e.id,
                "?",
                "?",
                "?",
                "?",
                "?",
                status_word(e)
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `checkpoints inspect`
pub async fn inspect(args: &JobArgs, id: Option<u64>, json: bool) -> anyhow::Result<ExitCode> {
    let (store, job) = args.open()?;
    let (js, entries) = entries(&store, &job).await?;
    let manifest = match id {
        Some(id) => js.manifest(CheckpointId(id)).await?,
        None => js.latest().await?,
    };
    let entry = entries.iter().find(|e| e.id == manifest.checkpoint);
    if json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("job         {}", manifest.job);
    println!("checkpoint  {}", manifest.checkpoint);
    println!("epoch       {}", manifest.epoch);
    println!("created     {} UTC", format_unix_ms(manifest.created_at_ms));
    println!(
        "state       {} raw, {} stored",
        format_bytes(manifest.state_bytes()),
        format_bytes(manifest.stored_bytes())
    );
    if let Some(e) = entry {
        println!("manifest    {} ({} bytes)", e.key, e.manifest_bytes);
    }
    for (worker, snapshot) in &manifest.workers {
        println!(
            "worker {worker}: {} chunks, {} raw, metadata {} bytes",
            snapshot.chunks.len(),
            format_bytes(snapshot.state_bytes()),
            snapshot.metadata.len()
        );
        for c in &snapshot.chunks {
            let shared = match c.written_by() {
                Some(w) if w != manifest.checkpoint => format!(" (from checkpoint {w})"),
                _ => String::new(),
            };
            println!(
                "  {}  {} {:>10} stored {:>10} raw  crc {:08x}{shared}",
                js.full_key(&c.key),
                c.codec,
                format_bytes(c.stored_len),
                format_bytes(c.raw_len),
                c.stored_crc
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `checkpoints verify`
pub async fn verify(args: &JobArgs, id: Option<u64>) -> anyhow::Result<ExitCode> {
    let (store, job) = args.open()?;
    let (js, entries) = entries(&store, &job).await?;
    let selected: Vec<&CheckpointEntry> = match id {
        Some(id) => {
            let found: Vec<_> = entries.iter().filter(|e| e.id.0 == id).collect();
            if found.is_empty() {
                bail!("job {job} has no checkpoint {id} in {}", store.url());
            }
            found
        }
        None => entries.iter().collect(),
    };
    let (mut good, mut bad, mut checkpoints_bad) = (0usize, 0usize, 0usize);
    for entry in selected {
        let manifest = match &entry.status {
            CheckpointStatus::Corrupt(reason) => {
                println!("checkpoint {}: BAD {}: {reason}", entry.id, entry.key);
                bad += 1;
                checkpoints_bad += 1;
                continue;
            }
            CheckpointStatus::Fenced { manifest, by } => {
                println!(
                    "checkpoint {}: note: fenced by epoch {by}, never restored; checking its objects anyway",
                    entry.id
                );
                manifest
            }
            CheckpointStatus::Committed(m) => m,
        };
        let report = js
            .verify(manifest)
            .await
            .with_context(|| format!("verifying checkpoint {}", entry.id))?;
        let n_bad = report.bad().count();
        for o in &report.objects {
            match &o.problem {
                None => good += 1,
                Some(p) => {
                    println!("checkpoint {}: BAD {}: {p}", entry.id, o.key);
                    bad += 1;
                }
            }
        }
        if n_bad == 0 {
            println!(
                "checkpoint {}: ok ({} objects, {})",
                entry.id,
                report.objects.len(),
                format_bytes(manifest.stored_bytes())
            );
        } else {
            checkpoints_bad += 1;
        }
    }
    if bad == 0 {
        println!("all {good} objects good");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{bad} bad objects in {checkpoints_bad} checkpoints ({good} good)");
        Ok(ExitCode::FAILURE)
    }
}

/// `checkpoints gc`
pub async fn gc(args: &JobArgs, keep: usize) -> anyhow::Result<ExitCode> {
    let (store, job) = args.open()?;
    let (js, _) = entries(&store, &job).await?;
    let report = js.gc(keep).await.context("retention pass")?;
    let ids = |v: &[CheckpointId]| {
        v.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("kept checkpoints: {}", ids(&report.retained));
    println!(
        "deleted manifests: {}",
        if report.deleted_manifests.is_empty() {
            "none".into()
        } else {
            ids(&report.deleted_manifests)
        }
    );
    println!(
        "deleted {} chunks ({}); kept {} chunks of checkpoints that may be in progress",
        report.deleted_chunks,
        format_bytes(report.deleted_bytes),
        report.kept_in_progress
    );
    Ok(ExitCode::SUCCESS)
}

/// `checkpoints savepoint`
pub async fn savepoint(args: &JobArgs, name: &str, id: Option<u64>) -> anyhow::Result<ExitCode> {
    let (store, job) = args.open()?;
    let js = store.job(job.clone());
    let id = match id {
        Some(id) => CheckpointId(id),
        None => {
            js.latest()
                .await
                .with_context(|| format!("reading the latest checkpoint of job {job}"))?
                .checkpoint
        }
    };
    let s = js
        .create_savepoint(name, id)
        .await
        .with_context(|| format!("savepoint {name:?} of job {job}"))?;
    println!(
        "savepoint {} pins checkpoint {} of job {job}",
        s.name, s.checkpoint
    );
    Ok(ExitCode::SUCCESS)
}

/// `checkpoints delete-savepoint`
pub async fn delete_savepoint(args: &JobArgs, name: &str) -> anyhow::Result<ExitCode> {
    let (store, job) = args.open()?;
    store
        .job(job.clone())
        .delete_savepoint(name)
        .await
        .with_context(|| format!("deleting savepoint {name:?} of job {job}"))?;
    println!("savepoint {name} of job {job} deleted");
    Ok(ExitCode::SUCCESS)
}
