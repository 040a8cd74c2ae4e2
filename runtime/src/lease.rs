//! VIP leases: who may hold the service VIP, and until when. Pure decisions
//! with an injected clock (times are `Duration`s since an arbitrary origin,
//! each side using its own clock), like the checkpoint coordinator.
//!
//! The safety argument (DESIGN.md, "VIP"):
//! - A holder counts its lease from the moment it *sent* the request, so its
//!   own view of the expiry is never later than the authority's.
//! - The authority grants the VIP to someone else only when the previous
//!   lease has surely expired, `expires_at + drift_margin` on its clock, or
//!   when the previous holder confirmed the release.
//! - A holder that has not renewed by its expiry drops the VIP (self-fencing).
//!
//! So as long as the two clocks drift apart by less than `drift_margin`
//! over one lease, two holders at once cannot happen. A process crash costs
//! no lease wait (the agent is alive and releases at once); a lost host costs
//! one lease length plus the margin.
//!
//! [`LeaseAuthority`] is the interface; [`LeaseTable`] is the in-supervisor
//! implementation. A later issue adds an etcd-backed one so leases outlive a
//! supervisor failover.

use std::time::Duration;

/// Lease settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a grant or renewal lasts. Default 1 s.
    pub length: Duration,
    /// Extra wait before a lease nobody released is given to another
    /// holder: covers clock drift and message delay. Default 200 ms.
    pub drift_margin: Duration,
    /// How often a holder renews; well under `length`. Default 250 ms.
    pub renew_every: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            length: Duration::from_secs(1),
            drift_margin: Duration::from_millis(200),
            renew_every: Duration::from_millis(250),
        }
    }
}

impl LeaseConfig {
    /// Checks the fields; errors name the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.length.is_zero() {
            return Err("lease.length: must be more than 0".into());
        }
        if self.renew_every.is_zero() || self.renew_every * 2 > self.length {
            return Err(
                "lease.renew_every: must be more than 0 and at most half of lease.length".into(),
            );
        }
        Ok(())
    }
}

/// A lease's identity: a fresh number per grant, so a stale renewal of an
/// older grant is never mistaken for the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseId(pub u64);

/// The authority's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseDecision {
    /// Granted (or renewed) until `expires_at` on the authority's clock.
    Granted {
        /// The lease.
        id: LeaseId,
        /// Its length from the request.
        length: Duration,
    },
    /// Someone else holds it; ask again at `retry_at` (authority clock).
    Held {
        /// The current holder.
        holder: String,
        /// When it may be granted at the earliest.
        retry_at: Duration,
    },
    /// The renewal refers to a lease that is no longer current: drop the VIP.
    Lost,
}

/// Grants, renews and takes back the VIP lease.
pub trait LeaseAuthority: std::fmt::Debug + Send {
    /// `holder` asks for the lease at `now`.
    fn acquire(&mut self, holder: &str, now: Duration) -> LeaseDecision;
    /// `holder` renews lease `id` at `now`.
    fn renew(&mut self, holder: &str, id: LeaseId, now: Duration) -> LeaseDecision;
    /// `holder` confirms it dropped the VIP: the lease ends at once.
    fn release(&mut self, holder: &str, id: LeaseId);
    /// Who holds the lease at `now`, and until when (authority clock).
    fn holder(&self, now: Duration) -> Option<(String, Duration)>;
    /// The id of the current lease, expired or not (for status).
    fn lease_id(&self) -> Option<LeaseId>;
}

#[derive(Debug, Clone)]
struct Current {
    holder: String,
    id: LeaseId,
    expires_at: Duration,
}

/// The in-supervisor lease authority for one VIP.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    config: LeaseConfig,
    current: Option<Current>,
    next_id: u64,
}

impl LeaseTable {
    /// An empty table.
    pub fn new(config: LeaseConfig) -> LeaseTable {
        LeaseTable {
            config,
            current: None,
            next_id: 1,
        }
    }

    /// The current lease's id, expired or not.
    pub fn current_id(&self) -> Option<LeaseId> {
        self.current.as_ref().map(|c| c.id)
    }

    fn grant(&mut self, holder: &str, now: Duration) -> LeaseDecision {
        let id = LeaseId(self.next_id);
        self.next_id += 1;
        self.current = Some(Current {
            holder: holder.to_string(),
            id,
            expires_at: now + self.config.length,
        });
        LeaseDecision::Granted {
            id,
            length: self.config.length,
        }
    }
}

impl LeaseAuthority for LeaseTable {
    fn acquire(&mut self, holder: &str, now: Duration) -> LeaseDecision {
        match &self.current {
            None => self.grant(holder, now),
            // The holder asking again (it lost track, or restarted): a fresh grant.
            Some(c) if c.holder == holder => self.grant(holder, now),
            Some(c) => {
                let surely_expired = c.expires_at + self.config.drift_margin;
                if now >= surely_expired {
                    self.grant(holder, now)
                } else {
                    LeaseDecision::Held {
                        holder: c.holder.clone(),
                        retry_at: surely_expired,
                    }
                }
            }
        }
    }

    fn renew(&mut self, holder: &str, id: LeaseId, now: Duration) -> LeaseDecision {
        match &mut self.current {
            // Only the current, unexpired lease can be renewed: once expired,
            // the holder has already dropped the VIP by its own clock.
            Some(c) if c.holder == holder && c.id == id && now < c.expires_at => {
                c.expires_at = now + self.config.length;
                LeaseDecision::Granted {
                    id,
                    length: self.config.length,
                }
            }
            _ => LeaseDecision::Lost,
        }
    }

    fn release(&mut self, holder: &str, id: LeaseId) {
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.holder == holder && c.id == id)
        {
            self.current = None;
        }
    }

    fn lease_id(&self) -> Option<LeaseId> {
        self.current_id()
    }

    fn holder(&self, now: Duration) -> Option<(String, Duration)> {
        self.current
            .as_ref()
            .filter(|c| now < c.expires_at + self.config.drift_margin)
            .map(|c| (c.holder.clone(), c.expires_at))
    }
}

/// The agent's side: whether it may hold the VIP right now, by its own clock.
#[derive(Debug, Clone, Default)]
pub struct LeaseHolder {
    lease: Option<(LeaseId, Duration)>,
}

impl LeaseHolder {
    /// A grant arrived for a request sent at `sent_at` (holder clock). The
    /// lease counts from the send time: never later than the authority's.
    pub fn on_granted(&mut self, id: LeaseId, length: Duration, sent_at: Duration) {
        self.lease = Some((id, sent_at + length));
    }

    /// The lease was refused or lost: drop the VIP.
    pub fn on_lost(&mut self) {
        self.lease = None;
    }

    /// The lease to renew, if any.
    pub fn lease(&self) -> Option<LeaseId> {
        self.lease.map(|(id, _)| id)
    }

    /// Whether the VIP may be held at `now` (holder clock). False from the
    /// expiry on: the agent removes the VIP and stops its primaries.
    pub fn valid(&self, now: Duration) -> bool {
        self.lease.is_some_and(|(_, until)| now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn table() -> LeaseTable {
        LeaseTable::new(LeaseConfig {
            length: ms(1000),
            drift_margin: ms(200),
            renew_every: ms(250),
        })
    }

    #[test]
    fn test_second_holder_waits_for_expiry_plus_margin() {
        let mut t = table();
        assert!(matches!(
            t.acquire("a", ms(0)),
            LeaseDecision::Granted { .. }
        ));
        assert_eq!(
            t.acquire("b", ms(500)),
            LeaseDecision::Held {
                holder: "a".into(),
                retry_at: ms(1200)
            }
        );
        assert!(matches!(
            t.acquire("b", ms(1199)),
            LeaseDecision::Held { .. }
        ));
        assert!(matches!(
            t.acquire("b", ms(1200)),
            LeaseDecision::Granted { .. }
        ));
        assert_eq!(t.holder(ms(1300)).map(|h| h.0), Some("b".into()));
    }

    #[test]
    fn test_release_hands_over_at_once() {
        let mut t = table();
        let LeaseDecision::Granted { id, .. } = t.acquire("a", ms(0)) else {
            panic!()
        };
        t.release("a", id);
        assert!(
            matches!(t.acquire("b", ms(10)), LeaseDecision::Granted { .. }),
            "a crash costs no lease wait"
        );
        // A stale release of the old lease does not free the new one.
        t.release("a", id);
        assert!(matches!(t.acquire("c", ms(20)), LeaseDecision::Held { .. }));
    }

    #[test]
    fn test_renewal_extends_and_late_renewal_is_lost() {
        let mut t = table();
        let LeaseDecision::Granted { id, .. } = t.acquire("a", ms(0)) else {
            panic!()
        };
        assert!(matches!(
            t.renew("a", id, ms(900)),
            LeaseDecision::Granted { .. }
        ));
        assert!(
            matches!(t.acquire("b", ms(1500)), LeaseDecision::Held { .. }),
            "renewed to 1900"
        );
        assert_eq!(
            t.renew("a", id, ms(1900)),
            LeaseDecision::Lost,
            "expired: the holder already dropped it"
        );
        assert_eq!(
            t.renew("b", id, ms(100)),
            LeaseDecision::Lost,
            "not b's lease"
        );
    }

    #[test]
    fn test_holder_self_fences_from_send_time() {
        let mut h = LeaseHolder::default();
        h.on_granted(LeaseId(1), ms(1000), ms(100));
        assert!(h.valid(ms(1099)));
        assert!(
            !h.valid(ms(1100)),
            "counted from the request, not the reply"
        );
        h.on_granted(LeaseId(1), ms(1000), ms(1000));
        h.on_lost();
        assert!(!h.valid(ms(1001)));
    }

    #[test]
    fn test_config_validation_names_fields() {
        let bad = LeaseConfig {
            renew_every: ms(600),
            ..LeaseConfig::default()
        };
        assert!(bad
            .validate()
            .expect_err("too slow")
            .contains("lease.renew_every"));
        assert!(LeaseConfig::default().validate().is_ok());
    }

    proptest! {
        // Two agents with clocks offset from the authority's, messages delayed
        // up to 50 ms, random gaps between events (so leases expire, renewals
        // come late and takeovers happen), agents renewing, going silent and
        // releasing at random: at no real instant do both consider themselves
        // holders.
        #[test]
        fn prop_never_two_holders(
            offsets in proptest::collection::vec(0u64..150, 2),
            events in proptest::collection::vec((0usize..2, 0u8..4, 0u64..50, 0u64..400), 1..200),
        ) {
            let mut t = table();
            let mut holders = [LeaseHolder::default(), LeaseHolder::default()];
            let names = ["a", "b"];
            let mut now = 0u64; // real time, ms
            for (who, action, delay, step) in events {
                let local = |i: usize, real: u64| ms(real + offsets[i]);
                let sent = local(who, now);
                let at_authority = ms(now + delay);
                match action {
                    0 => {
                        if let LeaseDecision::Granted { id, length } = t.acquire(names[who], at_authority) {
                            holders[who].on_granted(id, length, sent);
                        }
                    }
                    1 => if let Some(id) = holders[who].lease() {
                        match t.renew(names[who], id, at_authority) {
                            LeaseDecision::Granted { id, length } => holders[who].on_granted(id, length, sent),
                            _ => holders[who].on_lost(),
                        }
                    },
                    2 => if let Some(id) = holders[who].lease() {
                        // Drop the VIP first, then tell the authority.
                        holders[who].on_lost();
                        t.release(names[who], id);
                    },
                    _ => {} // silent (crashed or partitioned)
                }
                // Check every real millisecond up to the next event.
                for real in now..now + step + 1 {
                    let valid: Vec<bool> = (0..2).map(|i| holders[i].valid(local(i, real))).collect();
                    prop_assert!(!(valid[0] && valid[1]), "two holders at real time {} ms", real);
                }
                now += step;
            }
        }
    }
}
