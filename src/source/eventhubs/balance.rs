//! Which partition this instance claims next: the share-out rule of Event Hubs processors. Every
//! instance runs it on the same ownership table at every balancing round and claims at most one
//! partition per round, so that instances converge on an even split without a coordinator. After
//! an instance's first interval, a round that claimed a free partition is followed 100 ms later
//! by another (see the coordinator), so a lone instance does not wait an interval per partition.

use std::collections::BTreeMap;
use std::time::Duration;

/// One row of the ownership table, as read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Ownership {
    pub partition: String,
    /// Empty when the owner released it.
    pub owner: String,
    /// Bumped by every claim; a claim names the version it saw, so of two instances claiming the
    /// same partition only one wins. It is also the receiver's owner level (epoch): a new owner's
    /// is higher, so the service cuts the previous owner's receiver off.
    pub version: i64,
    /// Since the owner last renewed it, by the store's clock (instances' clocks may disagree).
    pub age: Duration,
    /// The Blob store's ETag of the ownership blob, which a claim is conditioned on (PostgreSQL
    /// conditions on `version`).
    pub etag: Option<String>,
}

/// A partition to claim, and the version of its row to claim it from (0: no row yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub partition: String,
    pub version: i64,
    /// Nobody held it (never owned, released, or its owner stopped renewing): claiming it takes
    /// nothing from another instance.
    pub free: bool,
    /// The ETag of the row seen (the Blob store); `None`: no blob yet, or PostgreSQL.
    pub etag: Option<String>,
}

/// The partition `me` should claim now, if any. `partitions` are the hub's partition ids.
pub fn next_claim(me: &str, partitions: &[String], rows: &[Ownership], expiry: Duration) -> Option<Claim> {
    let row = |p: &str| rows.iter().find(|r| r.partition == p);
    let live = |r: &Ownership| !r.owner.is_empty() && r.age < expiry;
    // Instances alive (holding at least one live partition), with what each holds; `me` counts.
    let mut held: BTreeMap<&str, Vec<&Ownership>> = BTreeMap::new();
    held.entry(me).or_default();
    for r in rows.iter().filter(|r| live(r) && partitions.contains(&r.partition)) {
        held.entry(r.owner.as_str()).or_default().push(r);
    }
    let instances = held.len();
    let floor = partitions.len() / instances;
    let ceil = partitions.len().div_ceil(instances);
    let mine = held[me].len();
    if mine >= ceil {
        return None;
    }
    // Free partitions first: never owned, released, or their owner stopped renewing.
    let free = partitions.iter().find(|p| row(p).is_none_or(|r| !live(r)));
    if let Some(p) = free {
        let (version, etag) = row(p).map_or((0, None), |r| (r.version, r.etag.clone()));
        return Some(Claim { partition: p.clone(), version, free: true, etag });
    }
    // None free: take one from the busiest instance, when it holds more than its share. With a
    // remainder some instances rightly hold `ceil`; only below `floor` may we take from those.
    let (_, busiest) =
        held.iter().filter(|(o, _)| **o != me).max_by_key(|(o, rs)| (rs.len(), std::cmp::Reverse(**o)))?;
    let over = if mine < floor { busiest.len() > floor } else { busiest.len() > ceil };
    if !over {
        return None;
    }
    let r = busiest.iter().min_by(|a, b| a.partition.cmp(&b.partition))?;
    Some(Claim { partition: r.partition.clone(), version: r.version, free: false, etag: r.etag.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(n: usize) -> Vec<String> {
        (0..n).map(|i| i.to_string()).collect()
    }

    fn own(p: usize, owner: &str, age_s: u64) -> Ownership {
        Ownership {
            partition: p.to_string(),
            owner: owner.into(),
            version: 3,
            age: Duration::from_secs(age_s),
            etag: None,
        }
    }

    const EXPIRY: Duration = Duration::from_secs(30);

    /// Rounds of every instance claiming (in turn) until no one claims: the split they settle on.
    fn settle(instances: &[&str], n: usize, mut rows: Vec<Ownership>) -> BTreeMap<String, usize> {
        for _ in 0..100 {
            let mut claimed = false;
            for me in instances {
                if let Some(c) = next_claim(me, &parts(n), &rows, EXPIRY) {
                    rows.retain(|r| r.partition != c.partition);
                    rows.push(Ownership {
                        partition: c.partition,
                        owner: me.to_string(),
                        version: c.version + 1,
                        age: Duration::ZERO,
                        etag: None,
                    });
                    claimed = true;
                }
            }
            if !claimed {
                break;
            }
        }
        let mut split = BTreeMap::new();
        for r in rows {
            *split.entry(r.owner).or_insert(0) += 1;
        }
        split
    }

    #[test]
    fn one_instance_claims_every_partition() {
        assert_eq!(settle(&["a"], 4, vec![]), BTreeMap::from([("a".into(), 4)]));
    }

    #[test]
    fn two_instances_split_four_partitions_evenly_even_when_one_had_all() {
        let all_a = (0..4).map(|p| own(p, "a", 1)).collect();
        assert_eq!(settle(&["a", "b"], 4, all_a), BTreeMap::from([("a".into(), 2), ("b".into(), 2)]));
    }

    #[test]
    fn three_instances_over_four_partitions_hold_two_one_one_without_stealing_back_and_forth() {
        let split = settle(&["a", "b", "c"], 4, vec![]);
        let mut counts: Vec<usize> = split.values().copied().collect();
        counts.sort();
        assert_eq!(counts, vec![1, 1, 2]);
    }

    #[test]
    fn a_dead_instances_partitions_are_taken_once_its_ownership_expires() {
        let rows = vec![own(0, "a", 1), own(1, "a", 1), own(2, "dead", 31), own(3, "dead", 31)];
        let c = next_claim("a", &parts(4), &rows, EXPIRY);
        assert_eq!(c, Some(Claim { partition: "2".into(), version: 3, free: true, etag: None }));
        let fresh = vec![own(0, "a", 1), own(1, "a", 1), own(2, "b", 29), own(3, "b", 29)];
        assert_eq!(next_claim("a", &parts(4), &fresh, EXPIRY), None, "not before expiry");
    }

    #[test]
    fn taking_from_another_instance_is_not_a_free_claim() {
        let all_a: Vec<Ownership> = (0..4).map(|p| own(p, "a", 1)).collect();
        assert_eq!(
            next_claim("b", &parts(4), &all_a, EXPIRY),
            Some(Claim { partition: "0".into(), version: 3, free: false, etag: None })
        );
    }

    #[test]
    fn a_released_partition_is_free_at_once() {
        let rows = vec![own(0, "a", 1), own(1, "", 0)];
        assert_eq!(
            next_claim("a", &parts(2), &rows, EXPIRY),
            Some(Claim { partition: "1".into(), version: 3, free: true, etag: None })
        );
    }
}
