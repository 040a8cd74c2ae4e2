//! Placement: which host runs each worker's primary, and where its standby
//! waits. Pure: the supervisor passes in the live hosts, the previous
//! placement and what failed, and gets the next placement back.
//!
//! Rules, in order:
//! - a worker whose primary did not fail stays where it is (its local cache
//!   is warm there);
//! - a failed worker (or one whose host is gone) moves to its standby host
//!   if that host is alive (`hot` and `cold`); without a standby it moves to
//!   the least loaded other live host, and stays only if there is none;
//! - a worker asked to move (a fail-back, `lazarus move`) goes to the host
//!   it prefers if that host is alive and allowed;
//! - each worker with a standby gets one on a live host other than its
//!   primary, kept where it was if possible, else the least loaded host.
//!   With a single live host there is no standby until another joins.

use std::collections::{BTreeMap, BTreeSet};

use lazarus_storage::WorkerId;

use crate::spec::StandbyKind;

/// Where one worker runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placed {
    /// The host of its primary process.
    pub primary: String,
    /// The host of its standby, if it has one.
    pub standby: Option<String>,
}

/// No live host to run on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no live host to place {0} on")]
pub struct NoHost(pub WorkerId);

/// One worker to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// The worker.
    pub id: WorkerId,
    /// Its standby kind.
    pub standby: StandbyKind,
    /// The hosts it may run on; empty: any.
    pub hosts: Vec<String>,
    /// Where it goes if it moves now (a fail-back or a `move`), if alive.
    pub prefer: Option<String>,
}

impl Want {
    /// A worker that may run anywhere.
    pub fn anywhere(id: WorkerId, standby: StandbyKind) -> Want {
        Want {
            id,
            standby,
            hosts: Vec::new(),
            prefer: None,
        }
    }

    fn allows(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h == host)
    }
}

/// The next placement of `workers` (in plan order) on `alive` hosts; a
/// worker with `hosts` goes only there.
pub fn place(
    workers: &[Want],
    alive: &BTreeSet<String>,
    previous: &BTreeMap<WorkerId, Placed>,
    failed: &BTreeSet<WorkerId>,
) -> Result<BTreeMap<WorkerId, Placed>, NoHost> {
    let load: BTreeMap<&str, usize> = alive.iter().map(|h| (h.as_str(), 0)).collect();
    let mut load = load;
    let least_loaded = |load: &BTreeMap<&str, usize>, want: &Want, not: Option<&str>| {
        load.iter()
            .filter(|(h, _)| Some(**h) != not && want.allows(h))
            .min_by_key(|(h, n)| (**n, **h))
            .map(|(h, _)| h.to_string())
    };
    let mut next = BTreeMap::new();
    // Primaries first, so standbys go where primaries are fewest.
    for want in workers {
        let (w, kind) = (&want.id, &want.standby);
        let prev = previous.get(w);
        let usable = |h: &String| alive.contains(h) && want.allows(h);
        let stays = prev.filter(|p| usable(&p.primary) && !failed.contains(w));
        let preferred = want.prefer.as_ref().filter(|h| usable(h));
        let primary = match (stays, prev) {
            (Some(p), _) => p.primary.clone(),
            (None, _) if preferred.is_some() => preferred.cloned().expect("checked"),
            (None, Some(p))
                if *kind != StandbyKind::None && p.standby.as_ref().is_some_and(usable) =>
            {
                p.standby.clone().expect("checked")
            }
            (None, Some(p)) => least_loaded(&load, want, Some(&p.primary))
                .or_else(|| usable(&p.primary).then(|| p.primary.clone()))
                .ok_or_else(|| NoHost(w.clone()))?,
            (None, None) => least_loaded(&load, want, None).ok_or_else(|| NoHost(w.clone()))?,
        };
        *load.get_mut(primary.as_str()).expect("a live host") += 1;
        next.insert(
            w.clone(),
            Placed {
                primary,
                standby: None,
            },
        );
    }
    for want in workers {
        let w = &want.id;
        if want.standby == StandbyKind::None {
            continue;
        }
        let primary = next[w].primary.clone();
        let keep = previous
            .get(w)
            .and_then(|p| p.standby.clone())
            .filter(|s| alive.contains(s) && want.allows(s) && *s != primary);
        let standby = keep.or_else(|| least_loaded(&load, want, Some(&primary)));
        if let Some(s) = &standby {
            *load.get_mut(s.as_str()).expect("a live host") += 1;
        }
        next.get_mut(w).expect("placed above").standby = standby;
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> WorkerId {
        WorkerId::new(s).expect("valid")
    }

    fn wants(ws: &[(WorkerId, StandbyKind)]) -> Vec<Want> {
        ws.iter()
            .map(|(id, k)| Want::anywhere(id.clone(), *k))
            .collect()
    }

    #[test]
    fn test_hosts_constraint_is_kept_for_primary_standby_and_moves() {
        let lb = Want {
            id: w("lb-0"),
            standby: StandbyKind::Hot,
            hosts: vec!["lb1".into(), "lb2".into()],
            prefer: None,
        };
        let be = Want {
            id: w("be-0"),
            standby: StandbyKind::None,
            hosts: vec!["be1".into()],
            prefer: None,
        };
        let all = hosts(&["be1", "lb1", "lb2", "x"]);
        let first = place(
            &[lb.clone(), be.clone()],
            &all,
            &BTreeMap::new(),
            &BTreeSet::new(),
        )
        .expect("placed");
        let p = &first[&w("lb-0")];
        let pair: BTreeSet<String> =
            [p.primary.clone(), p.standby.clone().expect("standby")].into();
        assert_eq!(pair, hosts(&["lb1", "lb2"]));
        assert_eq!(first[&w("be-0")].primary, "be1");
        // be-0 fails: it may only restart on be1.
        let failed = BTreeSet::from([w("be-0")]);
        let second = place(&[lb.clone(), be.clone()], &all, &first, &failed).expect("placed");
        assert_eq!(second[&w("be-0")].primary, "be1");
        // be1 is gone: nowhere to go.
        let no_be = hosts(&["lb1", "lb2", "x"]);
        assert!(place(&[be], &no_be, &first, &BTreeSet::new()).is_err());
        // lb's standby host is lost: no standby on x, ever.
        let only = hosts(&[p.primary.as_str(), "x"]);
        let third = place(&[lb], &only, &first, &BTreeSet::new()).expect("placed");
        assert_eq!(third[&w("lb-0")].standby, None);
    }

    #[test]
    fn test_a_move_goes_to_the_preferred_host_if_it_is_alive_and_allowed() {
        let mut kv = Want::anywhere(w("kv-0"), StandbyKind::None);
        let all = hosts(&["a", "b", "c"]);
        let first = place(&[kv.clone()], &all, &BTreeMap::new(), &BTreeSet::new()).expect("placed");
        let here = first[&w("kv-0")].primary.clone();
        let there = if here == "c" { "b" } else { "c" };
        kv.prefer = Some(there.into());
        let failed = BTreeSet::from([w("kv-0")]);
        let moved = place(&[kv.clone()], &all, &first, &failed).expect("placed");
        assert_eq!(moved[&w("kv-0")].primary, there);
        // Not alive, or not allowed: placed as any failed worker instead.
        kv.prefer = Some("gone".into());
        let elsewhere = place(&[kv.clone()], &all, &first, &failed).expect("placed");
        assert_ne!(elsewhere[&w("kv-0")].primary, here);
        kv.prefer = Some(there.into());
        kv.hosts = vec![here.clone()];
        let kept = place(&[kv], &all, &first, &failed).expect("placed");
        assert_eq!(kept[&w("kv-0")].primary, here);
        // Without a failure the preference does not move anything.
        let mut still = Want::anywhere(w("kv-0"), StandbyKind::None);
        still.prefer = Some(there.into());
        let same = place(&[still], &all, &first, &BTreeSet::new()).expect("placed");
        assert_eq!(same[&w("kv-0")].primary, here);
    }

    fn hosts(h: &[&str]) -> BTreeSet<String> {
        h.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn test_spreads_primaries_and_puts_standby_elsewhere() {
        let workers = [
            (w("src-0"), StandbyKind::None),
            (w("kv-0"), StandbyKind::Hot),
            (w("sink-0"), StandbyKind::Cold),
        ];
        let p = place(
            &wants(&workers),
            &hosts(&["a", "b", "c"]),
            &BTreeMap::new(),
            &BTreeSet::new(),
        )
        .expect("placed");
        let primaries: BTreeSet<_> = p.values().map(|x| x.primary.clone()).collect();
        assert_eq!(primaries.len(), 3, "{p:?}");
        for (id, kind) in &workers {
            let x = &p[id];
            match kind {
                StandbyKind::None => assert_eq!(x.standby, None),
                _ => assert!(x.standby.as_ref().is_some_and(|s| *s != x.primary), "{x:?}"),
            }
        }
    }

    #[test]
    fn test_failed_worker_moves_to_its_standby_and_gets_a_new_one() {
        let workers = [(w("kv-0"), StandbyKind::Hot)];
        let alive = hosts(&["a", "b"]);
        let first =
            place(&wants(&workers), &alive, &BTreeMap::new(), &BTreeSet::new()).expect("placed");
        let old = first[&w("kv-0")].clone();
        let second = place(
            &wants(&workers),
            &alive,
            &first,
            &BTreeSet::from([w("kv-0")]),
        )
        .expect("placed");
        let new = &second[&w("kv-0")];
        assert_eq!(Some(new.primary.clone()), old.standby);
        assert_eq!(new.standby, Some(old.primary.clone()));
        // Not failed: nothing moves.
        let third = place(&wants(&workers), &alive, &second, &BTreeSet::new()).expect("placed");
        assert_eq!(third, second);
    }

    #[test]
    fn test_lost_host_moves_everything_on_it() {
        let workers = [(w("a-0"), StandbyKind::None), (w("b-0"), StandbyKind::Cold)];
        let first = place(
            &wants(&workers),
            &hosts(&["h1", "h2"]),
            &BTreeMap::new(),
            &BTreeSet::new(),
        )
        .expect("placed");
        let lost = first[&w("b-0")].primary.clone();
        let alive: BTreeSet<String> = hosts(&["h1", "h2"])
            .into_iter()
            .filter(|h| *h != lost)
            .collect();
        let second = place(&wants(&workers), &alive, &first, &BTreeSet::new()).expect("placed");
        for x in second.values() {
            assert!(alive.contains(&x.primary), "{second:?}");
            assert_eq!(x.standby, None, "one host left: no standby");
        }
    }

    #[test]
    fn test_no_standby_restarts_on_another_host_or_stays() {
        let workers = [(w("x-0"), StandbyKind::None)];
        let two = hosts(&["a", "b"]);
        let first =
            place(&wants(&workers), &two, &BTreeMap::new(), &BTreeSet::new()).expect("placed");
        let failed = BTreeSet::from([w("x-0")]);
        let second = place(&wants(&workers), &two, &first, &failed).expect("placed");
        assert_ne!(second[&w("x-0")].primary, first[&w("x-0")].primary);
        let only = hosts(&[first[&w("x-0")].primary.as_str()]);
        let third = place(&wants(&workers), &only, &first, &failed).expect("placed");
        assert_eq!(third[&w("x-0")].primary, first[&w("x-0")].primary);
        assert!(place(&wants(&workers), &BTreeSet::new(), &first, &failed).is_err());
    }
}
