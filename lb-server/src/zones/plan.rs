//! The zone plan, pure: from demand per client zone and capacity per
//! backend zone, how much of each client zone's calls stays in its zone and
//! where the rest goes.
//!
//! The problem is a transportation problem whose costs are 0 within a zone
//! and positive across zones, with a cap on what each backend zone may
//! take: `(1 + tolerance) × its capacity share × all calls`. With equal
//! cross-zone costs, keeping as much local as the caps allow is optimal for
//! the cross-zone total (the caps sum to more than the demand, so whatever
//! a full zone cannot keep fits elsewhere). So the plan is built greedily:
//!
//! 1. Clients whose zone is unknown get the service's whole list: their
//!    calls land on every zone by its capacity share, before anything else.
//! 2. Each client zone keeps what its own zone can take, up to its cap.
//!    A zone with fewer than `min_healthy` backends keeps nothing.
//! 3. The excess spills, in stages: to zones of the same region, then to
//!    any zone, then to zones under `min_healthy`, each filled up to its
//!    cap by water-filling (the least loaded, relative to its capacity
//!    share, first), so that spilled load evens out instead of piling on
//!    the first zone with room.
//! 4. What still does not fit (the caps are too tight) is spread over all
//!    zones by water-filling without caps.
//!
//! Every client zone of one spill group spills in the same proportions.

use std::collections::BTreeMap;

/// A backend zone: where calls can go.
#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    /// The zone ("" = backends of unknown zone).
    pub zone: String,
    /// Its region ("" = unknown).
    pub region: String,
    /// Capacity: the sum of its backends' weights (list entries).
    pub capacity: f64,
    /// Healthy (listed) backends in it.
    pub healthy: usize,
}

/// A client zone: where calls come from.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    /// The zone.
    pub zone: String,
    /// Its region ("" = unknown).
    pub region: String,
    /// Calls per second (or clients, until rates are known).
    pub demand: f64,
}

/// The plan's knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanSettings {
    /// How far above its capacity share a zone may be loaded (0.1 = 10 %).
    pub tolerance: f64,
    /// A zone with fewer healthy backends than this keeps none of its
    /// clients' calls.
    pub min_healthy: usize,
}

/// Where each client zone's calls go.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Per client zone: destination zone → fraction of its calls (summing
    /// to 1). Empty when no backend has capacity.
    pub rows: BTreeMap<String, BTreeMap<String, f64>>,
    /// Planned load of each destination zone, relative to its capacity
    /// share of all calls (1.0 = exactly its share).
    pub loads: BTreeMap<String, f64>,
    /// Fraction of the zoned clients' calls planned across zones.
    pub cross_zone: f64,
}

impl Plan {
    /// The largest difference between two plans' fractions, summed over
    /// one row's destinations (rows present in only one count as 2).
    pub fn distance(&self, other: &Plan) -> f64 {
        let mut worst: f64 = 0.0;
        for (zone, row) in &self.rows {
            let d = match other.rows.get(zone) {
                None => 2.0,
                Some(o) => {
                    let keys: std::collections::BTreeSet<&String> =
                        row.keys().chain(o.keys()).collect();
                    keys.into_iter()
                        .map(|k| {
                            (row.get(k).copied().unwrap_or(0.0) - o.get(k).copied().unwrap_or(0.0))
                                .abs()
                        })
                        .sum()
                }
            };
            worst = worst.max(d);
        }
        if other.rows.keys().any(|z| !self.rows.contains_key(z)) {
            worst = 2.0;
        }
        worst
    }
}

/// Demand below this counts as this (an idle zone is planned as if it were
/// about to call).
const MIN_DEMAND: f64 = 1e-6;

struct Dest<'a> {
    d: &'a Destination,
    share: f64,
    cap: f64,
    load: f64,
    eligible: bool,
}

/// The plan for `origins` (zoned clients), `unzoned` demand (clients of
/// unknown zone) and `destinations`.
pub fn plan(
    origins: &[Origin],
    unzoned: f64,
    destinations: &[Destination],
    settings: &PlanSettings,
) -> Plan {
    let total_capacity: f64 = destinations.iter().map(|d| d.capacity.max(0.0)).sum();
    if total_capacity <= 0.0 || origins.is_empty() {
        return Plan::default();
    }
    let demand: Vec<f64> = origins.iter().map(|o| o.demand.max(MIN_DEMAND)).collect();
    let unzoned = unzoned.max(0.0);
    let total = demand.iter().sum::<f64>() + unzoned;
    let tolerance = settings.tolerance.max(0.0);
    let mut dests: Vec<Dest<'_>> = destinations
        .iter()
        .filter(|d| d.capacity > 0.0)
        .map(|d| {
            let share = d.capacity / total_capacity;
            Dest {
                d,
                share,
                cap: (1.0 + tolerance) * share * total,
                // Step 1: unzoned clients take the whole list.
                load: unzoned * share,
                eligible: d.healthy >= settings.min_healthy.max(1),
            }
        })
        .collect();
    let mut flows = vec![vec![0.0; dests.len()]; origins.len()];
    let mut excess = demand.clone();
    // Step 2: keep local.
    for (i, o) in origins.iter().enumerate() {
        if let Some(j) = dests.iter().position(|d| d.d.zone == o.zone && d.eligible) {
            let keep = excess[i].min((dests[j].cap - dests[j].load).max(0.0));
            flows[i][j] += keep;
            dests[j].load += keep;
            excess[i] -= keep;
        }
    }
    // Step 3: spill, same region first.
    let regions: std::collections::BTreeSet<&str> =
        origins.iter().map(|o| o.region.as_str()).collect();
    for region in regions {
        let group: Vec<usize> = (0..origins.len())
            .filter(|&i| origins[i].region == region)
            .collect();
        let targets: Vec<usize> = (0..dests.len())
            .filter(|&j| dests[j].eligible && dests[j].d.region == region)
            .collect();
        spill(&group, &targets, &mut dests, &mut flows, &mut excess, true);
    }
    let everyone: Vec<usize> = (0..origins.len()).collect();
    let eligible: Vec<usize> = (0..dests.len()).filter(|&j| dests[j].eligible).collect();
    spill(
        &everyone,
        &eligible,
        &mut dests,
        &mut flows,
        &mut excess,
        true,
    );
    let small: Vec<usize> = (0..dests.len()).filter(|&j| !dests[j].eligible).collect();
    spill(&everyone, &small, &mut dests, &mut flows, &mut excess, true);
    // Step 4: over the caps, evenly.
    let all: Vec<usize> = (0..dests.len()).collect();
    spill(&everyone, &all, &mut dests, &mut flows, &mut excess, false);

    let mut rows = BTreeMap::new();
    let mut local = 0.0;
    for (i, o) in origins.iter().enumerate() {
        let mut row = BTreeMap::new();
        for (j, d) in dests.iter().enumerate() {
            if flows[i][j] > 0.0 {
                row.insert(d.d.zone.clone(), flows[i][j] / demand[i]);
            }
            if d.d.zone == o.zone {
                local += flows[i][j];
            }
        }
        rows.insert(o.zone.clone(), row);
    }
    let zoned: f64 = demand.iter().sum();
    Plan {
        rows,
        loads: dests
            .iter()
            .map(|d| (d.d.zone.clone(), d.load / (d.share * total)))
            .collect(),
        cross_zone: (1.0 - local / zoned).clamp(0.0, 1.0),
    }
}

/// Moves the excess of `group` to `targets`, filling the least loaded
/// (relative to capacity share) first, within the caps when `capped`.
fn spill(
    group: &[usize],
    targets: &[usize],
    dests: &mut [Dest<'_>],
    flows: &mut [Vec<f64>],
    excess: &mut [f64],
    capped: bool,
) {
    let amount_wanted: f64 = group.iter().map(|&i| excess[i]).sum();
    if amount_wanted <= 0.0 || targets.is_empty() {
        return;
    }
    let room = |d: &Dest<'_>| {
        if capped {
            (d.cap - d.load).max(0.0)
        } else {
            f64::INFINITY
        }
    };
    let amount = amount_wanted.min(targets.iter().map(|&j| room(&dests[j])).sum());
    if amount <= 0.0 {
        return;
    }
    // Water level λ: each target is filled to λ × its share, within its room.
    let fill = |level: f64, dests: &[Dest<'_>]| -> f64 {
        targets
            .iter()
            .map(|&j| (level * dests[j].share - dests[j].load).clamp(0.0, room(&dests[j])))
            .sum()
    };
    let (mut lo, mut hi) = (0.0, 1.0);
    while fill(hi, dests) < amount && hi < 1e12 {
        hi *= 2.0;
    }
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if fill(mid, dests) < amount {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let adds: Vec<(usize, f64)> = targets
        .iter()
        .map(|&j| {
            (
                j,
                (hi * dests[j].share - dests[j].load).clamp(0.0, room(&dests[j])),
            )
        })
        .collect();
    let placed: f64 = adds.iter().map(|(_, x)| x).sum();
    if placed <= 0.0 {
        return;
    }
    let scale = amount / placed;
    for &i in group {
        let part = excess[i] / amount_wanted;
        for &(j, x) in &adds {
            flows[i][j] += x * scale * part;
        }
        excess[i] -= amount * part;
    }
    for (j, x) in adds {
        dests[j].load += x * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(zone: &str, region: &str, capacity: f64, healthy: usize) -> Destination {
        Destination {
            zone: zone.into(),
            region: region.into(),
            capacity,
            healthy,
        }
    }

    fn origin(zone: &str, region: &str, demand: f64) -> Origin {
        Origin {
            zone: zone.into(),
            region: region.into(),
            demand,
        }
    }

    const TEN: PlanSettings = PlanSettings {
        tolerance: 0.1,
        min_healthy: 1,
    };

    fn three() -> Vec<Destination> {
        vec![
            dest("a", "", 3.0, 3),
            dest("b", "", 3.0, 3),
            dest("c", "", 3.0, 3),
        ]
    }

    #[test]
    fn balanced_demand_stays_local() {
        let o = vec![
            origin("a", "", 10.0),
            origin("b", "", 10.0),
            origin("c", "", 10.0),
        ];
        let p = plan(&o, 0.0, &three(), &TEN);
        for z in ["a", "b", "c"] {
            assert_eq!(p.rows[z].len(), 1);
            assert!((p.rows[z][z] - 1.0).abs() < 1e-9);
        }
        assert!(p.cross_zone < 1e-9);
    }

    #[test]
    fn skewed_demand_spills_just_enough_and_evenly() {
        let o = vec![
            origin("a", "", 60.0),
            origin("b", "", 30.0),
            origin("c", "", 10.0),
        ];
        let p = plan(&o, 0.0, &three(), &TEN);
        // a keeps its cap: 1.1 × 1/3 of 100 = 36.67 of 60.
        assert!((p.rows["a"]["a"] - 36.667 / 60.0).abs() < 1e-3, "{p:?}");
        assert!((p.cross_zone - 0.23333).abs() < 1e-3, "{}", p.cross_zone);
        assert!((p.rows["b"]["b"] - 1.0).abs() < 1e-9);
        assert!((p.rows["c"]["c"] - 1.0).abs() < 1e-9);
        // The spill levels b and c at 31.67 each.
        assert!((p.loads["b"] - p.loads["c"]).abs() < 1e-6, "{:?}", p.loads);
        let max = p.loads.values().copied().fold(0.0, f64::max);
        assert!(max <= 1.1 + 1e-9, "{:?}", p.loads);
        let sum: f64 = p.rows["a"].values().sum();
        assert!((sum - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_zone_without_backends_spills_everything() {
        let d = vec![dest("a", "", 3.0, 3), dest("b", "", 3.0, 3)];
        let o = vec![
            origin("a", "", 10.0),
            origin("b", "", 10.0),
            origin("c", "", 10.0),
        ];
        let p = plan(&o, 0.0, &d, &TEN);
        assert!(!p.rows["c"].contains_key("c"));
        assert!((p.rows["c"]["a"] - 0.5).abs() < 1e-6, "{p:?}");
        assert!((p.cross_zone - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn a_zone_under_min_healthy_keeps_nothing_and_takes_only_what_does_not_fit() {
        let d = vec![
            dest("a", "", 6.0, 3),
            dest("b", "", 6.0, 3),
            dest("c", "", 1.0, 1),
        ];
        let settings = PlanSettings {
            tolerance: 0.1,
            min_healthy: 2,
        };
        let o = vec![
            origin("a", "", 10.0),
            origin("b", "", 10.0),
            origin("c", "", 0.5),
        ];
        let p = plan(&o, 0.0, &d, &settings);
        assert!(!p.rows["c"].contains_key("c"), "{p:?}");
        assert!(p.loads.get("c").copied().unwrap_or(0.0) < 1e-9, "{p:?}");
    }

    #[test]
    fn spill_goes_to_the_same_region_first() {
        let d = vec![
            dest("a1", "eu", 1.0, 1),
            dest("a2", "eu", 1.0, 1),
            dest("b1", "us", 1.0, 1),
        ];
        let o = vec![origin("a1", "eu", 2.0), origin("b1", "us", 0.5)];
        let p = plan(&o, 0.0, &d, &TEN);
        let row = &p.rows["a1"];
        assert!(row["a2"] > row.get("b1").copied().unwrap_or(0.0), "{row:?}");
    }

    #[test]
    fn unzoned_clients_take_their_share_first() {
        let o = vec![origin("a", "", 30.0)];
        // 60 calls/s of unknown zone load every zone with 20.
        let p = plan(&o, 60.0, &three(), &TEN);
        // a's cap is 1.1 × 30 = 33; it keeps 13 of 30.
        assert!((p.rows["a"]["a"] - 13.0 / 30.0).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn distance_sees_moved_shares_and_new_zones() {
        let o = vec![origin("a", "", 60.0), origin("b", "", 30.0)];
        let p1 = plan(&o, 0.0, &three(), &TEN);
        let p2 = plan(&o, 0.0, &three(), &TEN);
        assert!(p1.distance(&p2) < 1e-9);
        let o3 = vec![
            origin("a", "", 60.0),
            origin("b", "", 30.0),
            origin("c", "", 1.0),
        ];
        assert_eq!(plan(&o3, 0.0, &three(), &TEN).distance(&p1), 2.0);
    }
}
