//! One ejected set for the whole cluster: replicas share their verdicts.
//!
//! Each replica judges from the reports of the clients connected to it, so
//! two replicas may reach different verdicts, or the same verdict a second
//! apart. Clients of both must still get the same lists. So a replica that
//! ejects a backend publishes a [`Vote`] (through the cluster's etcd
//! session, on its lease: a dead replica's votes go with it), and every
//! replica, itself included, applies the same rule to the votes it reads
//! ([`adopt`]):
//!
//! - a backend with a vote from any replica is ejected everywhere, for as
//!   long as a vote stands (the voter withdraws it when its own ejection
//!   ends, and every replica moves the backend to probation together). A
//!   vote still there [`GRACE`] after the voter's ejection should have
//!   ended is stale and counts for nothing, so a lost withdrawal cannot
//!   hold a backend out;
//! - at most the cap is ejected: backends are taken in the order of their
//!   oldest standing vote in etcd (its revision, the same for every
//!   reader), then by token. A replica whose own ejection lost that race
//!   takes it back and holds the backend instead (on probation if it had
//!   been ejected before), with an alert, as the judge does at the cap.
//!
//! A replica without a session reads no votes: it judges alone, as it
//! checks health alone ([`crate::cluster`]), and ejections it only adopted
//! end in probation.

use std::time::{Duration, Instant};

use super::judge::{Phase, State};

/// A vote that outlives its reader's copy of the voter's deadline by this
/// much still holds the ejection: the voter's withdrawal, not a timer,
/// ends an adopted ejection.
pub const GRACE: Duration = Duration::from_secs(5);

/// One replica's ejection of a backend, as published.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Vote {
    /// The voter's ejections of this backend so far.
    pub times: u32,
    /// How much longer the voter's ejection runs, from when it wrote this
    /// (milliseconds in JSON: replicas' clocks may disagree, durations do
    /// not).
    #[serde(rename = "remaining_ms", with = "millis")]
    pub remaining: Duration,
    /// The voter's reason, in words.
    pub why: String,
}

mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().min(u64::MAX as u128) as u64)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms: u64 = serde::Deserialize::deserialize(d)?;
        Ok(Duration::from_millis(ms))
    }
}

/// A vote as a replica read it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadVote {
    /// The voter's replica id.
    pub replica: String,
    /// What it said.
    pub vote: Vote,
    /// The etcd revision that created its key (orders votes the same way
    /// on every replica).
    pub revision: i64,
    /// When the reader read it.
    pub read_at: Instant,
}

/// One backend as [`adopt`] sees it.
pub struct Standing<'a> {
    /// Its token (ties).
    pub token: &'a str,
    /// Votes read for it (this replica's own included, once read back).
    pub votes: &'a [ReadVote],
    /// Its state, changed in place.
    pub state: &'a mut State,
}

impl ReadVote {
    /// When the voter's ejection ends, as this reader counts, plus
    /// [`GRACE`] for its withdrawal to arrive. A vote past it is stale (a
    /// withdrawal lost on the way) and counts for nothing.
    pub fn deadline(&self) -> Instant {
        self.read_at + self.vote.remaining + GRACE
    }
}

/// Applies the cluster's votes to one service's backends before the judge
/// runs, with `me` this replica's id, `cap` the service's ejection cap and
/// `probation_weight` the weight factor of a backend on probation.
/// Returns whether any state changed.
pub fn adopt(
    me: &str,
    cap: usize,
    probation_weight: f64,
    backends: &mut [Standing<'_>],
    now: Instant,
) -> bool {
    // The cluster's ejected set: backends with a standing vote, in the
    // order of their oldest standing vote in etcd, at most the cap.
    let mut voted: Vec<(i64, &str, usize)> = backends
        .iter()
        .enumerate()
        .filter_map(|(k, b)| {
            let oldest = b
                .votes
                .iter()
                .filter(|v| v.deadline() > now)
                .map(|v| v.revision)
                .min()?;
            Some((oldest, b.token, k))
        })
        .collect();
    voted.sort();
    let ejected: Vec<usize> = voted.iter().take(cap).map(|&(_, _, k)| k).collect();
    let mut changed = false;
    for (k, b) in backends.iter_mut().enumerate() {
        let in_set = ejected.contains(&k);
        // Other replicas' standing votes: this replica's own state says
        // what its own vote means.
        let theirs = || {
            b.votes
                .iter()
                .filter(|v| v.replica != me && v.deadline() > now)
        };
        let own_vote_read = b.votes.iter().any(|v| v.replica == me);
        let state = &mut *b.state;
        match (&state.phase, state.by.is_some(), in_set) {
            // Another replica's ejection: adopted.
            (Phase::Admitted | Phase::Probation, _, true) => {
                let Some(vote) = theirs().max_by_key(|v| v.deadline()) else {
                    continue;
                };
                state.times = state.times.max(vote.vote.times);
                state.phase = Phase::Ejected {
                    until: vote.deadline(),
                };
                state.since = now;
                state.held = false;
                state.weight_factor = 1.0;
                state.why = format!("{} (judged by {})", vote.vote.why, vote.replica);
                state.by = Some(vote.replica.clone());
                changed = true;
            }
            // Adopted and still standing: until its latest deadline.
            (Phase::Ejected { .. }, true, true) => {
                if let Some(until) = theirs().map(ReadVote::deadline).max() {
                    state.phase = Phase::Ejected { until };
                }
            }
            // An adopted ejection whose votes are withdrawn (or stale, or
            // over the cap): it ends now, and the judge starts probation.
            (Phase::Ejected { .. }, true, false) => {
                state.phase = Phase::Ejected { until: now };
                state.by = None;
                changed = true;
            }
            // This replica's own ejection, read back but over the cap:
            // other replicas' came first. Taken back: held in the list,
            // on probation if it had been ejected before.
            (Phase::Ejected { .. }, false, false) if own_vote_read => {
                state.times = state.times.saturating_sub(1);
                state.since = now;
                state.held = true;
                if state.times > 0 {
                    state.phase = Phase::Probation;
                    state.weight_factor = probation_weight;
                } else {
                    state.phase = Phase::Admitted;
                    state.weight_factor = 1.0;
                }
                state.why = format!(
                    "suspect, held: the cluster's ejection cap ({cap}) is reached by other \
                     replicas' ejections"
                );
                changed = true;
            }
            _ => {}
        }
    }
    changed
}

/// The vote this replica publishes for a backend in `state` (`None`: no
/// vote): only for an ejection of its own judgement.
pub fn own_vote(state: &State, now: Instant) -> Option<Vote> {
    match state.phase {
        Phase::Ejected { until } if state.by.is_none() => Some(Vote {
            times: state.times,
            remaining: until.saturating_duration_since(now),
            why: state.why.clone(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(replica: &str, revision: i64, now: Instant, secs: u64) -> ReadVote {
        ReadVote {
            replica: replica.into(),
            vote: Vote {
                times: 1,
                remaining: Duration::from_secs(secs),
                why: "31 % errors".into(),
            },
            revision,
            read_at: now,
        }
    }

    fn run(me: &str, cap: usize, states: &mut [State], votes: &[Vec<ReadVote>], now: Instant) {
        let tokens: Vec<String> = (0..states.len()).map(|i| format!("t{i}")).collect();
        let mut standings: Vec<Standing<'_>> = states
            .iter_mut()
            .zip(votes)
            .zip(&tokens)
            .map(|((state, votes), token)| Standing {
                token,
                votes,
                state,
            })
            .collect();
        adopt(me, cap, 0.2, &mut standings, now);
    }

    #[test]
    fn another_replicas_ejection_is_adopted_until_withdrawn_then_probation() {
        let now = Instant::now();
        let mut states = vec![State::new(now), State::new(now)];
        let votes = vec![vec![vote("lb2", 10, now, 30)], vec![]];
        run("lb1", 1, &mut states, &votes, now);
        assert!(states[0].ejected());
        assert_eq!(states[0].by.as_deref(), Some("lb2"));
        assert!(states[0].why.contains("judged by lb2"));
        assert!(!states[1].ejected());
        // No vote of its own for an adopted ejection.
        assert_eq!(own_vote(&states[0], now), None);
        // Standing past the voter's own deadline, within the grace: the
        // vote holds it.
        let later = now + Duration::from_secs(31);
        run("lb1", 1, &mut states, &votes, later);
        assert!(states[0].ejected());
        // Withdrawn: the ejection ends now (the judge starts probation).
        run("lb1", 1, &mut states, &[vec![], vec![]], later);
        assert_eq!(states[0].phase, Phase::Ejected { until: later });
        assert_eq!(states[0].by, None);
    }

    #[test]
    fn a_stale_vote_and_this_replicas_own_vote_are_never_adopted() {
        let now = Instant::now();
        let mut states = vec![State::new(now), State::new(now)];
        // lb2's vote whose withdrawal never came, past its deadline; and
        // lb1's own vote read back after lb1 itself moved on (probation).
        states[1].phase = Phase::Probation;
        let stale = vote("lb2", 10, now - Duration::from_secs(60), 30);
        let votes = vec![vec![stale], vec![vote("lb1", 11, now, 30)]];
        run("lb1", 2, &mut states, &votes, now);
        assert!(!states[0].ejected(), "a stale vote adopted");
        assert_eq!(states[1].phase, Phase::Probation, "its own vote adopted");
    }

    #[test]
    fn a_probation_ejection_taken_back_over_the_cap_stays_on_probation() {
        let now = Instant::now();
        let mut states = vec![State::new(now), State::new(now)];
        states[1].phase = Phase::Ejected {
            until: now + Duration::from_secs(60),
        };
        states[1].times = 2;
        let votes = vec![
            vec![vote("lb2", 10, now, 30)],
            vec![vote("lb1", 11, now, 60)],
        ];
        run("lb1", 1, &mut states, &votes, now);
        assert_eq!(states[1].phase, Phase::Probation);
        assert_eq!((states[1].times, states[1].weight_factor), (1, 0.2));
        assert!(states[1].held);
    }

    #[test]
    fn the_first_vote_in_etcd_wins_the_cap_and_the_loser_holds() {
        let now = Instant::now();
        // lb1 ejected backend 1 itself; lb2 ejected backend 0 first.
        let mut mine = vec![State::new(now), State::new(now)];
        mine[1].phase = Phase::Ejected {
            until: now + Duration::from_secs(30),
        };
        mine[1].times = 1;
        assert!(own_vote(&mine[1], now).is_some());
        // Before its own vote is read back, lb1 keeps its ejection…
        let votes = vec![vec![vote("lb2", 10, now, 30)], vec![]];
        run("lb1", 1, &mut mine, &votes, now);
        assert!(mine[1].ejected(), "own vote not read back yet");
        // …and once both are read, the earlier one wins on both replicas.
        let votes = vec![
            vec![vote("lb2", 10, now, 30)],
            vec![vote("lb1", 11, now, 30)],
        ];
        run("lb1", 1, &mut mine, &votes, now);
        assert!(mine[0].ejected() && mine[0].by.as_deref() == Some("lb2"));
        assert!(!mine[1].ejected() && mine[1].held);
        assert_eq!(mine[1].times, 0);
        assert_eq!(own_vote(&mine[1], now), None, "its vote is withdrawn");

        let mut theirs = vec![State::new(now), State::new(now)];
        theirs[0].phase = Phase::Ejected {
            until: now + Duration::from_secs(30),
        };
        theirs[0].times = 1;
        run("lb2", 1, &mut theirs, &votes, now);
        assert!(theirs[0].ejected() && theirs[0].by.is_none());
        assert!(!theirs[1].ejected(), "over the cap on lb2 too");
    }

    #[test]
    fn with_room_under_the_cap_every_vote_counts_and_ties_go_by_token() {
        let now = Instant::now();
        let mut states = vec![State::new(now); 3];
        let votes = vec![
            vec![vote("lb3", 7, now, 30)],
            vec![vote("lb2", 7, now, 30)],
            vec![vote("lb2", 9, now, 30)],
        ];
        run("lb1", 2, &mut states, &votes, now);
        let ejected: Vec<bool> = states.iter().map(State::ejected).collect();
        assert_eq!(ejected, [true, true, false]);
    }

    #[test]
    fn votes_round_trip_as_json_with_durations_in_milliseconds() {
        let v = Vote {
            times: 2,
            remaining: Duration::from_millis(59_500),
            why: "ejected".into(),
        };
        let json = serde_json::to_string(&v).unwrap();
        assert!(json.contains("\"remaining_ms\":59500"), "{json}");
        assert_eq!(serde_json::from_str::<Vote>(&json).unwrap(), v);
    }
}
