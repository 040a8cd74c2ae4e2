//! One VIP on the agent, as a pure state machine: the supervisor asks the
//! agent to hold or release it, the lease authority grants, refuses or takes
//! back its lease, time passes; the holder answers with [`HolderAction`]s
//! for the agent's shell (lease requests to send, the address to add or
//! remove, announcement bursts to start or stop, primaries to stop). It
//! reads no clock and touches no interface: times come in as `Duration`s on
//! the agent's clock, so the self-fencing rules are tested without sleeping.
//!
//! Rules (DESIGN.md, "VIP"; the authority's side is [`crate::lease`]):
//! 1. The address goes on the interface only with a lease that is valid by
//!    the agent's own clock, counted from the moment the request was sent.
//! 2. At the lease's expiry without a renewal the address comes off, any
//!    announcement burst stops, and the agent's primaries are stopped
//!    (self-fencing); the holder then asks again.
//! 3. A release (asked by the supervisor, a lost lease, or shutdown) stops
//!    the burst, removes the address and confirms the release to the
//!    authority, so the next holder need not wait for expiry.
//! 4. No announcement for the VIP leaves the host after rules 2 or 3: the
//!    shell owns the burst task and aborts it on [`HolderAction::StopAnnounce`].

use std::collections::HashMap;
use std::time::Duration;

use crate::cluster::wire::GarpSettings;
use crate::lease::{LeaseHolder, LeaseId};

/// What the agent's shell must do for one VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderAction {
    /// Ask the authority for the lease (request number `seq`).
    Acquire {
        /// Request number, to pair the answer with this request.
        seq: u64,
    },
    /// Renew lease `id` (request number `seq`).
    Renew {
        /// The lease.
        id: LeaseId,
        /// Request number.
        seq: u64,
    },
    /// Tell the authority lease `id` is given back (the address is off).
    Released {
        /// The lease.
        id: LeaseId,
    },
    /// Add the address to the interface, then report [`VipHolder::added`].
    AddAddress,
    /// Remove the address from the interface.
    RemoveAddress,
    /// Start an announcement burst (replacing one still running).
    StartAnnounce,
    /// Stop the running announcement burst, if any.
    StopAnnounce,
    /// The lease ran out while held: stop this host's primaries.
    StopPrimaries,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct VipHolder {
    /// Announcement settings.
    garp: GarpSettings,
    /// How often the lease is renewed.
    renew_every: Duration,
    lease: LeaseHolder,
    /// The supervisor wants this host to hold the VIP.
    wanted: bool,
    /// The address is on the interface.
    on_iface: bool,
    /// Requests in flight: request number → send time.
    pending: HashMap<u64, Duration>,
    next_renew: Duration,
    retry_at: Option<Duration>,
    refresh_at: Option<Duration>,
}

impl VipHolder {
    /// A holder that does not hold anything yet.
    pub fn new(garp: GarpSettings, renew_every: Duration) -> VipHolder {
        VipHolder {
            garp,
            renew_every,
            lease: LeaseHolder::default(),
            wanted: false,
            on_iface: false,
            pending: HashMap::new(),
            next_renew: Duration::ZERO,
            retry_at: None,
            refresh_at: None,
        }
    }

    /// Whether the address is on the interface.
    pub fn on_iface(&self) -> bool {
        self.on_iface
    }

    /// The announcement settings in force.
    pub fn garp(&self) -> GarpSettings {
        self.garp
    }

    /// The lease held, if any.
    pub fn lease(&self) -> Option<LeaseId> {
        self.lease.lease()
    }

    fn request(&mut self, now: Duration, seq: &mut u64) -> u64 {
        *seq += 1;
        self.pending.insert(*seq, now);
        *seq
    }

    /// The supervisor asks this host to hold the VIP.
    pub fn hold(&mut self, now: Duration, garp: GarpSettings, seq: &mut u64) -> Vec<HolderAction> {
        self.wanted = true;
        self.garp = garp;
        if self.lease.lease().is_some() {
            return Vec::new();
        }
        self.retry_at = Some(now + self.renew_every);
        vec![HolderAction::Acquire {
            seq: self.request(now, seq),
        }]
    }

    /// Stop holding (asked by the supervisor, the lease is lost, or the
    /// agent shuts down): rule 3.
    pub fn release(&mut self) -> Vec<HolderAction> {
        self.wanted = false;
        self.retry_at = None;
        self.refresh_at = None;
        let mut out = self.take_off();
        if let Some(id) = self.lease.lease() {
            self.lease.on_lost();
            out.push(HolderAction::Released { id });
        }
        out
    }

    fn take_off(&mut self) -> Vec<HolderAction> {
        if !self.on_iface {
            return vec![HolderAction::StopAnnounce];
        }
        self.on_iface = false;
        vec![HolderAction::StopAnnounce, HolderAction::RemoveAddress]
    }

    /// The authority granted (or renewed) lease `id` for `length`, in answer
    /// to request `seq`.
    pub fn granted(
        &mut self,
        now: Duration,
        id: LeaseId,
        length: Duration,
        seq: u64,
    ) -> Vec<HolderAction> {
        let Some(sent_at) = self.pending.remove(&seq) else {
            return Vec::new();
        };
        if !self.wanted {
            return vec![HolderAction::Released { id }];
        }
        // Rule 1: counted from the send time, never later than the
        // authority's view.
        self.lease.on_granted(id, length, sent_at);
        self.next_renew = sent_at + self.renew_every;
        self.retry_at = None;
        if !self.on_iface && self.lease.valid(now) {
            return vec![HolderAction::AddAddress];
        }
        Vec::new()
    }

    /// The shell tried to add the address: `ok` or not.
    pub fn added(&mut self, now: Duration, ok: bool) -> Vec<HolderAction> {
        if !ok {
            // Give the lease back and try again later.
            self.retry_at = Some(now + self.renew_every);
            let id = self.lease.lease();
            self.lease.on_lost();
            return id
                .map(|id| HolderAction::Released { id })
                .into_iter()
                .collect();
        }
        self.on_iface = true;
        if self.garp.refresh_ms > 0 {
            self.refresh_at = Some(now + Duration::from_millis(self.garp.refresh_ms));
        }
        vec![HolderAction::StartAnnounce]
    }

    /// The authority says the lease ran out (an etcd lease that expired):
    /// as rule 2, the address comes off and the primaries stop at once, and
    /// the holder asks again (it is still wanted).
    pub fn expired(&mut self, now: Duration) -> Vec<HolderAction> {
        let mut out = self.take_off();
        let held = self.lease.lease().is_some();
        self.lease.on_lost();
        self.refresh_at = None;
        if held {
            out.push(HolderAction::StopPrimaries);
        }
        if self.wanted {
            self.retry_at = Some(now);
        }
        out
    }

    /// The lease is held by another host; ask again after `retry`.
    pub fn held_elsewhere(&mut self, now: Duration, retry: Duration) {
        self.retry_at = Some(now + retry);
    }

    /// Time passed: expiry (rule 2), renewals, retries and refresh bursts.
    pub fn tick(&mut self, now: Duration, seq: &mut u64) -> Vec<HolderAction> {
        if self.on_iface && !self.lease.valid(now) {
            // Rule 2: no renewal by the expiry, by our own clock.
            let mut out = self.take_off();
            self.lease.on_lost();
            self.refresh_at = None;
            out.push(HolderAction::StopPrimaries);
            // Ask again: the authority decides whether it is still ours.
            self.retry_at = Some(now);
            return out;
        }
        let mut out = Vec::new();
        if let Some(id) = self.lease.lease() {
            if now >= self.next_renew {
                self.next_renew = now + self.renew_every;
                out.push(HolderAction::Renew {
                    id,
                    seq: self.request(now, seq),
                });
            }
        } else if self.wanted && self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = Some(now + self.renew_every);
            out.push(HolderAction::Acquire {
                seq: self.request(now, seq),
            });
        }
        if self.on_iface && self.refresh_at.is_some_and(|t| now >= t) {
            self.refresh_at = Some(now + Duration::from_millis(self.garp.refresh_ms));
            out.push(HolderAction::StartAnnounce);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HolderAction as A;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn garp(refresh_ms: u64) -> GarpSettings {
        GarpSettings {
            count: 3,
            delay_ms: 10,
            refresh_ms,
        }
    }

    /// A holder with lease `id` granted at `t` (request sent at `t`).
    fn holding(t: Duration, refresh: u64, seq: &mut u64) -> VipHolder {
        let mut h = VipHolder::new(garp(refresh), ms(250));
        let out = h.hold(t, garp(refresh), seq);
        assert_eq!(out, vec![A::Acquire { seq: *seq }]);
        assert_eq!(
            h.granted(t + ms(5), LeaseId(1), ms(1000), *seq),
            vec![A::AddAddress]
        );
        assert_eq!(h.added(t + ms(6), true), vec![A::StartAnnounce]);
        assert!(h.on_iface());
        h
    }

    #[test]
    fn test_address_only_with_a_valid_lease_counted_from_the_request() {
        let mut seq = 0;
        let mut h = VipHolder::new(garp(0), ms(250));
        let out = h.hold(ms(0), garp(0), &mut seq);
        assert_eq!(out, vec![A::Acquire { seq: 1 }]);
        // The grant arrives after the lease (counted from the send) ran out.
        assert!(h.granted(ms(1001), LeaseId(1), ms(1000), 1).is_empty());
        assert!(
            !h.on_iface(),
            "an expired grant puts nothing on the interface"
        );
        // An answer to a request never sent is ignored.
        assert!(h.granted(ms(1002), LeaseId(2), ms(1000), 99).is_empty());
    }

    #[test]
    fn test_expiry_removes_the_address_stops_the_burst_and_the_primaries() {
        let mut seq = 0;
        let mut h = holding(ms(0), 0, &mut seq);
        // Renewals are sent but never answered (the authority is cut off).
        assert!(matches!(h.tick(ms(250), &mut seq)[..], [A::Renew { .. }]));
        assert!(matches!(h.tick(ms(500), &mut seq)[..], [A::Renew { .. }]));
        assert!(h
            .tick(ms(999), &mut seq)
            .iter()
            .all(|a| matches!(a, A::Renew { .. })));
        let out = h.tick(ms(1000), &mut seq);
        assert_eq!(
            out,
            vec![A::StopAnnounce, A::RemoveAddress, A::StopPrimaries],
            "at the expiry, by the agent's clock"
        );
        assert!(!h.on_iface());
        // Then it asks again.
        assert!(matches!(
            h.tick(ms(1001), &mut seq)[..],
            [A::Acquire { .. }]
        ));
    }

    #[test]
    fn test_expired_in_the_authority_takes_the_address_off_and_asks_again() {
        let mut seq = 0;
        let mut h = holding(ms(0), 0, &mut seq);
        assert_eq!(
            h.expired(ms(100)),
            vec![A::StopAnnounce, A::RemoveAddress, A::StopPrimaries]
        );
        assert!(!h.on_iface());
        // Still wanted: the next tick asks for the lease again.
        assert_eq!(h.tick(ms(101), &mut seq), vec![A::Acquire { seq }]);
    }

    #[test]
    fn test_renewal_answered_in_time_keeps_the_address() {
        let mut seq = 0;
        let mut h = holding(ms(0), 0, &mut seq);
        let [A::Renew { id, seq: s }] = h.tick(ms(250), &mut seq)[..] else {
            panic!("a renewal");
        };
        assert!(h.granted(ms(260), id, ms(1000), s).is_empty());
        assert!(h
            .tick(ms(1100), &mut seq)
            .iter()
            .all(|a| !matches!(a, A::RemoveAddress)));
        assert!(h.on_iface(), "valid until 250 + 1000 ms");
    }

    #[test]
    fn test_release_stops_the_burst_before_removing_and_confirms() {
        let mut seq = 0;
        let mut h = holding(ms(0), 100, &mut seq);
        let out = h.release();
        assert_eq!(
            out,
            vec![
                A::StopAnnounce,
                A::RemoveAddress,
                A::Released { id: LeaseId(1) }
            ]
        );
        // Nothing more for this VIP: no refresh burst, no request.
        for t in [100, 200, 300, 1500] {
            assert!(h.tick(ms(t), &mut seq).is_empty(), "at {t} ms");
        }
        // A grant that crosses the release is given back at once.
        let mut h = VipHolder::new(garp(0), ms(250));
        let _ = h.hold(ms(0), garp(0), &mut seq);
        let _ = h.release();
        assert_eq!(
            h.granted(ms(1), LeaseId(7), ms(1000), seq),
            vec![A::Released { id: LeaseId(7) }]
        );
    }

    #[test]
    fn test_refresh_bursts_repeat_while_held() {
        let mut seq = 0;
        let mut h = holding(ms(0), 100, &mut seq);
        assert!(h.tick(ms(50), &mut seq).is_empty());
        assert_eq!(h.tick(ms(106), &mut seq), vec![A::StartAnnounce]);
        assert!(h.tick(ms(150), &mut seq).is_empty());
        assert_eq!(h.tick(ms(206), &mut seq), vec![A::StartAnnounce]);
    }

    #[test]
    fn test_failed_add_gives_the_lease_back_and_retries() {
        let mut seq = 0;
        let mut h = VipHolder::new(garp(0), ms(250));
        let _ = h.hold(ms(0), garp(0), &mut seq);
        assert_eq!(
            h.granted(ms(1), LeaseId(3), ms(1000), 1),
            vec![A::AddAddress]
        );
        assert_eq!(h.added(ms(2), false), vec![A::Released { id: LeaseId(3) }]);
        assert!(h.tick(ms(100), &mut seq).is_empty());
        assert!(matches!(h.tick(ms(252), &mut seq)[..], [A::Acquire { .. }]));
    }

    #[test]
    fn test_held_elsewhere_waits_for_the_retry_time() {
        let mut seq = 0;
        let mut h = VipHolder::new(garp(0), ms(250));
        let _ = h.hold(ms(0), garp(0), &mut seq);
        h.held_elsewhere(ms(2), ms(901));
        assert!(h.tick(ms(900), &mut seq).is_empty());
        assert!(matches!(h.tick(ms(903), &mut seq)[..], [A::Acquire { .. }]));
    }
}
