//! VIP leases in etcd, held by the agent itself (HA clusters): the lease
//! authority of [`crate::lease`] on etcd, so a VIP does not depend on any
//! supervisor being up.
//!
//! The agent holds one etcd lease (TTL = the VIP lease length) and keeps it
//! alive itself. A VIP is held by writing `<prefix>/vips/<vip>` = agent name,
//! bound to that lease, only when the key is absent (or already ours):
//! - a new holder only after a confirmed release (the key deleted by its
//!   holder) or the old lease's expiry in etcd, which is never before the old
//!   holder fenced itself: the holder counts its lease from the moment it
//!   *sent* the request, etcd from the moment it *received* the keep-alive;
//! - renewals are keep-alives of the agent's lease; an answer renews every
//!   VIP that asked, a lost lease loses them all, and no answer lets them run
//!   out by the holder's own clock (it removes the address and stops its
//!   primaries).
//!
//! Answers come back as the supervisor's lease messages
//! ([`SupervisorMsg::LeaseGranted`], `LeaseHeld`, `LeaseLost`), so the
//! agent's [`crate::cluster::vip_holder::VipHolder`]s do not know which
//! authority they talk to.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::{mpsc, oneshot};

use crate::cluster::wire::{HaWelcome, SupervisorMsg};

/// Bound on one etcd request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

enum Req {
    Acquire { vip: String, seq: u64 },
    Renew { vip: String, seq: u64 },
    Release { vip: String },
    Flush(oneshot::Sender<()>),
}

/// The agent's handle on its etcd VIP leases.
pub struct EtcdVips {
    reqs: mpsc::UnboundedSender<Req>,
}

impl EtcdVips {
    /// Starts the lease task of agent `name`; answers go to `answers`.
    pub fn start(
        cfg: HaWelcome,
        name: String,
        answers: mpsc::UnboundedSender<SupervisorMsg>,
        tasks: &tokio_util::task::TaskTracker,
    ) -> EtcdVips {
        let (reqs, rx) = mpsc::unbounded_channel();
        tasks.spawn(
            Task {
                ttl: (cfg.lease_ms.div_ceil(1000) as i64).max(2),
                cfg,
                name,
                answers,
                client: None,
                lease: None,
                waiting: Vec::new(),
            }
            .run(rx),
        );
        EtcdVips { reqs }
    }

    /// Ask for `vip`'s lease (request `seq`).
    pub fn acquire(&self, vip: &str, seq: u64) {
        let _ = self.reqs.send(Req::Acquire {
            vip: vip.into(),
            seq,
        });
    }

    /// Renew `vip`'s lease (request `seq`).
    pub fn renew(&self, vip: &str, seq: u64) {
        let _ = self.reqs.send(Req::Renew {
            vip: vip.into(),
            seq,
        });
    }

    /// `vip` is off the interface: delete its key if it is ours.
    pub fn release(&self, vip: &str) {
        let _ = self.reqs.send(Req::Release { vip: vip.into() });
    }

    /// Waits (bounded) until every request sent so far is done: at
    /// shutdown, the releases reach etcd before the agent exits.
    pub async fn flush(&self, limit: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.reqs.send(Req::Flush(tx)).is_ok() {
            let _ = tokio::time::timeout(limit, rx).await;
        }
    }
}

struct Lease {
    id: i64,
    /// The keep-alive stream; `None` after it broke (etcd unreachable):
    /// the next renewal opens a new one for the same lease.
    alive: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    /// A keep-alive is out and not answered.
    outstanding: bool,
}

struct Task {
    cfg: HaWelcome,
    ttl: i64,
    name: String,
    answers: mpsc::UnboundedSender<SupervisorMsg>,
    client: Option<etcd_client::Client>,
    lease: Option<Lease>,
    /// Renewals waiting for the keep-alive's answer: (vip, seq).
    waiting: Vec<(String, u64)>,
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("etcd did not answer within {REQUEST_TIMEOUT:?}")),
    }
}

impl Task {
    /// The lease length the holder counts with: the TTL less a margin for
    /// clock rate differences (a tenth, at least 100 ms), so it fences
    /// before etcd could let another host take the VIP.
    fn length_ms(&self) -> u64 {
        let ttl = self.ttl as u64 * 1000;
        ttl - (ttl / 10).max(100)
    }

    fn key(&self, vip: &str) -> String {
        format!("{}/vips/{vip}", self.cfg.prefix)
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Req>) {
        // The agent's lease lives as long as the agent, VIPs or not: one
        // granted for a request that found the VIP held elsewhere must
        // still be alive when the VIP comes free.
        let mut keep = tokio::time::interval(Duration::from_millis(self.ttl as u64 * 250));
        keep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let has_lease = self.lease.is_some();
            let keepalive = async {
                match self.lease.as_mut().and_then(|l| l.alive.as_mut()) {
                    Some((_, stream)) => stream.message().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                req = rx.recv() => match req {
                    Some(r) => self.handle(r).await,
                    None => return,
                },
                answer = keepalive => self.on_keepalive(answer),
                _ = keep.tick(), if has_lease => {
                    if let Err(e) = self.keep_alive().await {
                        tracing::warn!(error = %e, "etcd keep-alive failed");
                        self.waiting.clear();
                        self.drop_connection();
                    }
                }
            }
        }
    }

    async fn handle(&mut self, req: Req) {
        match req {
            Req::Acquire { vip, seq } => self.acquire(vip, seq).await,
            Req::Renew { vip, seq } => {
                if self.lease.is_none() {
                    let _ = self.answers.send(SupervisorMsg::LeaseLost { vip });
                    return;
                }
                self.waiting.push((vip, seq));
                if let Err(e) = self.keep_alive().await {
                    // No answer will come: the VIPs run out by their
                    // holders' clocks unless a later renewal gets through.
                    tracing::warn!(error = %e, "etcd keep-alive failed");
                    self.waiting.clear();
                    self.drop_connection();
                }
            }
            Req::Release { vip } => {
                let (Some(mut client), Some(lease)) = (self.client.clone(), self.lease.as_ref())
                else {
                    return;
                };
                let key = self.key(&vip);
                let txn = Txn::new()
                    .when([
                        Compare::value(key.clone(), CompareOp::Equal, self.name.clone()),
                        Compare::lease(key.clone(), CompareOp::Equal, lease.id),
                    ])
                    .and_then([TxnOp::delete(key, None)]);
                match bounded(client.txn(txn)).await {
                    Ok(r) if r.succeeded() => tracing::info!(%vip, "VIP lease released in etcd"),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(%vip, error = %e, "releasing the VIP lease in etcd failed; it runs out with the agent's lease")
                    }
                }
            }
            Req::Flush(done) => {
                let _ = done.send(());
            }
        }
    }

    /// Sends one keep-alive for the lease (unless one is out), opening the
    /// stream again if it broke.
    async fn keep_alive(&mut self) -> Result<(), String> {
        let Some(id) = self.lease.as_ref().map(|l| l.id) else {
            return Err("no lease".into());
        };
        if self.lease.as_ref().is_some_and(|l| l.outstanding) {
            return Ok(());
        }
        if self.lease.as_ref().is_some_and(|l| l.alive.is_none()) {
            let mut client = self.client().await?;
            self.reopen(&mut client, id).await?;
            // The first answer, which came with the stream, renewed it.
            self.grant_waiting(id as u64);
            return Ok(());
        }
        let Some((keeper, _)) = self.lease.as_mut().and_then(|l| l.alive.as_mut()) else {
            return Err("no keep-alive stream".into());
        };
        bounded(keeper.keep_alive()).await?;
        if let Some(l) = self.lease.as_mut() {
            l.outstanding = true;
        }
        Ok(())
    }

    fn grant_waiting(&mut self, id: u64) {
        let length_ms = self.length_ms();
        for (vip, seq) in std::mem::take(&mut self.waiting) {
            let _ = self.answers.send(SupervisorMsg::LeaseGranted {
                vip,
                id,
                length_ms,
                seq,
            });
        }
    }

    /// The lease is gone in etcd: every VIP under it is lost.
    fn lose_all(&mut self) {
        tracing::warn!("the agent's etcd lease expired in etcd");
        self.lease = None;
        for (vip, _) in std::mem::take(&mut self.waiting) {
            let _ = self.answers.send(SupervisorMsg::LeaseLost { vip });
        }
    }

    fn on_keepalive(
        &mut self,
        answer: Result<Option<etcd_client::LeaseKeepAliveResponse>, etcd_client::Error>,
    ) {
        match answer {
            Ok(Some(r)) if r.ttl() > 0 => {
                if let Some(l) = self.lease.as_mut() {
                    l.outstanding = false;
                }
                self.grant_waiting(r.id() as u64);
            }
            // etcd says the lease expired: the VIPs under it are lost.
            Ok(Some(_)) => self.lose_all(),
            // The stream broke (etcd unreachable, no quorum): no answer for
            // the waiting renewals, so the VIPs run out by their holders'
            // clocks unless a later renewal gets through.
            other => {
                tracing::warn!(error = ?other.err(), "etcd keep-alive stream broke");
                self.waiting.clear();
                self.drop_connection();
            }
        }
    }

    fn drop_connection(&mut self) {
        if let Some(l) = self.lease.as_mut() {
            l.alive = None;
            l.outstanding = false;
        }
        self.client = None;
    }

    /// A client and a live lease, made on demand.
    /// The etcd client, connecting on demand.
    async fn client(&mut self) -> Result<etcd_client::Client, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let c = crate::ha::connect(&self.cfg.etcd)
            .await
            .map_err(|e| e.to_string())?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Opens a new keep-alive stream for lease `id` after the old one
    /// broke. Its first answer comes with it: a lease etcd let expire is
    /// refused here, and then every VIP under it is lost.
    async fn reopen(&mut self, client: &mut etcd_client::Client, id: i64) -> Result<(), String> {
        match bounded(client.lease_keep_alive(id)).await {
            Ok(stream) => {
                if let Some(l) = self.lease.as_mut() {
                    l.alive = Some(stream);
                }
                Ok(())
            }
            Err(e) => {
                if e.contains("lease not found") {
                    self.lose_all();
                }
                Err(e)
            }
        }
    }

    async fn ensure_lease(&mut self) -> Result<(etcd_client::Client, i64), String> {
        let mut client = self.client().await?;
        if let Some(l) = self.lease.as_ref().filter(|l| l.alive.is_some()) {
            return Ok((client, l.id));
        }
        if let Some(id) = self.lease.as_ref().map(|l| l.id) {
            // The stream broke: the same lease, if etcd still has it.
            match self.reopen(&mut client, id).await {
                Ok(()) => return Ok((client, id)),
                // Expired: a new lease below.
                Err(_) if self.lease.is_none() => {}
                Err(e) => return Err(e),
            }
        }
        let id = bounded(client.lease_grant(self.ttl, None)).await?.id();
        let stream = bounded(client.lease_keep_alive(id)).await?;
        self.lease = Some(Lease {
            id,
            alive: Some(stream),
            outstanding: false,
        });
        Ok((client, id))
    }

    async fn acquire(&mut self, vip: String, seq: u64) {
        let answer = match self.try_acquire(&vip).await {
            Ok(None) => {
                let id = self.lease.as_ref().map_or(0, |l| l.id as u64);
                tracing::info!(%vip, lease = id, "VIP lease granted by etcd");
                SupervisorMsg::LeaseGranted {
                    vip,
                    id,
                    length_ms: self.length_ms(),
                    seq,
                }
            }
            Ok(Some(holder)) => SupervisorMsg::LeaseHeld {
                vip,
                holder,
                retry_ms: 100,
            },
            Err(e) => {
                tracing::warn!(%vip, error = %e, "cannot reach etcd for the VIP lease");
                self.drop_connection();
                SupervisorMsg::LeaseHeld {
                    vip,
                    holder: format!("(etcd unreachable: {e})"),
                    retry_ms: 250,
                }
            }
        };
        let _ = self.answers.send(answer);
    }

    /// `Ok(None)`: ours now; `Ok(Some(holder))`: someone else's.
    async fn try_acquire(&mut self, vip: &str) -> Result<Option<String>, String> {
        let (mut client, lease) = self.ensure_lease().await?;
        let key = self.key(vip);
        let put = || {
            TxnOp::put(
                key.clone(),
                self.name.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        // Absent: ours. Ours already (under an older lease of this agent,
        // say): rebind it to the current lease.
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([put()])
            .or_else([TxnOp::txn(
                Txn::new()
                    .when([Compare::value(
                        key.clone(),
                        CompareOp::Equal,
                        self.name.clone(),
                    )])
                    .and_then([put()])
                    .or_else([TxnOp::get(key.clone(), None)]),
            )]);
        let resp = bounded(client.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(None);
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Txn(inner) = op {
                if inner.succeeded() {
                    return Ok(None);
                }
                for op in inner.op_responses() {
                    if let TxnOpResponse::Get(g) = op {
                        if let Some(kv) = g.kvs().first() {
                            return Ok(Some(String::from_utf8_lossy(kv.value()).into_owned()));
                        }
                    }
                }
            }
        }
        Ok(Some("(changed while asking)".into()))
    }
}
