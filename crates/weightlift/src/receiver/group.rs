//! A sharded trainer's ranks as one sender: each rank connects with its own pieces, the
//! receiver waits for every rank's hello ([`Gathering`]), plans once over all their pieces
//! (one plan, one hash, told to every rank with every rank's pieces), and takes each version
//! from all of them together: every rank's `Begin`, then each rank's share in rank order over
//! its own connection, each compared with that rank's digests. The version commits only when
//! every share verified (and, two-phase, rank 0 said commit); the report goes to every rank.
//! A rank that fails, goes away or sends a bad share fails the version, named in the report,
//! and ends the group: its ranks connect again for the next version.
//!
//! The shares are taken one after another, not side by side: each is written by every unpack
//! thread of the receiver, so the receiver's memory, not one rank's connection, sets the pace,
//! and the others' first buckets wait in their rings meanwhile.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use weightlift_core::{digest, plan, Plan, SourceSet};

use crate::protocol::{Message, ProblemNote, ProtocolError, ShardSource};
use crate::report::UpdateReport;

use super::connection::ConnectionError;
use super::handshake::{refuse, refuse_with, Agreed, Established, Greeted};
use super::settle::Outcome;
use super::{Receiver, Store};

/// The ranks of a sharded trainer connected so far, waiting for the rest.
#[derive(Default)]
pub(super) struct Gathering {
    pending: Mutex<Option<Pending>>,
    changed: Condvar,
}

struct Pending {
    world: u32,
    /// Per rank, the connection that said hello as it, with its arrival's number.
    ranks: Vec<Option<(u64, Greeted)>>,
    /// Hellos so far: each connection's number, by which its thread knows whether it is
    /// still waiting (not taken with the group, nor replaced by a newer one of its rank).
    arrivals: u64,
}

impl Pending {
    /// Refuses every rank waiting, with `reason`.
    fn refuse_all(self, reason: &str) {
        for (_, mut g) in self.ranks.into_iter().flatten() {
            drop(refuse(&mut g.conn, reason.to_string()));
        }
    }
}

impl Receiver {
    /// Serves a connection whose hello names a rank of a sharded trainer: parks it with the
    /// ranks connected so far and waits, up to the update timeout, for the rest. Once all are
    /// in, the thread of rank 0 plans and serves the group's updates, and the others' return;
    /// a rank whose wait runs out refuses every rank waiting, naming those that never came.
    pub(super) fn join_group(&self, mut greeted: Greeted) -> Result<(), ConnectionError> {
        let shard = greeted.hello.shard.clone().expect("only sharded hellos join a group");
        let (rank, world) = (shard.rank, shard.world);
        if rank >= world || shard.placements.len() != greeted.hello.source.len() {
            let reason = format!(
                "rank {rank} of {world} with {} placement(s) for {} tensor(s)",
                shard.placements.len(),
                greeted.hello.source.len()
            );
            return Err(refuse(&mut greeted.conn, reason));
        }
        if self.shared.stream.is_some() {
            let reason = "a streaming receiver takes one sender (not yet a sharded trainer)";
            return Err(refuse(&mut greeted.conn, reason.into()));
        }
        let gathering = &self.shared.gathering;
        let mut pending = gathering.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.as_ref().is_some_and(|p| p.world != world) {
            pending.take().expect("checked").refuse_all(&format!("a trainer of {world} ranks connected instead"));
        }
        let p =
            pending.get_or_insert_with(|| Pending { world, ranks: (0..world).map(|_| None).collect(), arrivals: 0 });
        p.arrivals += 1;
        let me = p.arrivals;
        if let Some((_, mut old)) = p.ranks[rank as usize].replace((me, greeted)) {
            drop(refuse(&mut old.conn, format!("replaced by a newer connection of rank {rank}")));
        }
        gathering.changed.notify_all();
        let timeout = self.shared.options.timeout;
        let deadline = Instant::now() + timeout;
        let members = loop {
            let waiting = pending.as_ref().is_some_and(|p| p.ranks[rank as usize].as_ref().is_some_and(|r| r.0 == me));
            if !waiting {
                // Taken with the group by rank 0's thread, or replaced.
                return Ok(());
            }
            let p = pending.as_ref().expect("waiting");
            if rank == 0 && p.ranks.iter().all(Option::is_some) {
                let p = pending.take().expect("checked");
                gathering.changed.notify_all();
                break p.ranks.into_iter().flatten().map(|(_, g)| g).collect::<Vec<_>>();
            }
            let now = Instant::now();
            if now >= deadline {
                let p = pending.take().expect("checked");
                let missing: Vec<String> =
                    (0..world).filter(|&r| p.ranks[r as usize].is_none()).map(|r| r.to_string()).collect();
                let reason = match missing.is_empty() {
                    true => format!("rank 0 of {world} did not take the group within {timeout:.1?}"),
                    false => format!("rank(s) {} of {world} did not connect within {timeout:.1?}", missing.join(", ")),
                };
                p.refuse_all(&reason);
                gathering.changed.notify_all();
                return Err(ConnectionError::Refused(reason));
            }
            pending = gathering.changed.wait_timeout(pending, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        };
        drop(pending);
        let (plan, members) = self.plan_group(members)?;
        self.run_group(&plan, members)
    }

    /// Plans one update over every rank's pieces and welcomes each rank with its share.
    fn plan_group(&self, mut members: Vec<Greeted>) -> Result<(Plan, Vec<Established>), ConnectionError> {
        let refuse_all = |members: &mut [Greeted], reason: String, problems: Vec<ProblemNote>| {
            for g in members.iter_mut() {
                drop(refuse_with(&mut g.conn, reason.clone(), problems.clone()));
            }
            ConnectionError::Refused(reason)
        };
        let first = &members[0].hello;
        let differs = members.iter().enumerate().skip(1).find_map(|(r, g)| {
            let what = match &g.hello {
                h if h.rules != first.rules => "rules",
                h if h.bucket_bytes != first.bucket_bytes => "bucket size",
                h if h.transport != first.transport => "transport",
                _ => return None,
            };
            Some(format!("trainer rank {r} offers another {what} than rank 0"))
        });
        if let Some(reason) = differs {
            return Err(refuse_all(&mut members, reason, Vec::new()));
        }
        let shards: Vec<ShardSource> = members
            .iter()
            .map(|g| ShardSource {
                source: g.hello.source.clone(),
                placements: g.hello.shard.as_ref().expect("sharded").placements.clone(),
            })
            .collect();
        let (manifests, placements) = shards.iter().map(|s| (s.source.clone(), s.placements.clone())).unzip();
        let planned = SourceSet::placed(manifests, placements)
            .and_then(|set| plan(&set, &self.shared.manifest, &members[0].hello.rules, self.shared.options.tp));
        let plan = match planned {
            Ok(plan) => plan,
            Err(e) => return Err(refuse_all(&mut members, e.to_string(), ProblemNote::all(&e))),
        };
        if let Err(e) = self.quantizes(&plan) {
            return Err(refuse_all(&mut members, e.to_string(), Vec::new()));
        }
        let plan_hash = plan.hash_hex();
        let mut established = Vec::with_capacity(members.len());
        let mut members = members.into_iter().enumerate();
        while let Some((r, Greeted { conn, hello, .. })) = members.next() {
            let agreed = Agreed { plan_hash: plan_hash.clone(), shards: Some(shards.clone()) };
            // A fresh deadline: the first ranks said hello a while ago.
            let deadline = Instant::now() + self.shared.options.handshake_timeout;
            match self.establish(conn, &hello, plan.share_of(r as u32), agreed, None, deadline) {
                Ok(member) => established.push(member),
                Err(e) => {
                    let reason = format!("trainer rank {r} could not be set up: {e}");
                    let mut rest: Vec<Greeted> = members.map(|(_, g)| g).collect();
                    return Err(refuse_all(&mut rest, reason, Vec::new()));
                }
            }
        }
        tracing::info!(ranks = established.len(), ops = plan.ops.len(), "sharded trainer connected");
        Ok((plan, established))
    }

    /// Serves the group's updates until one fails or a rank goes away.
    fn run_group(&self, plan: &Plan, mut members: Vec<Established>) -> Result<(), ConnectionError> {
        // Destinations several ranks write: each rank's digest covers its part only, so the
        // receiver digests the whole itself once every part verified.
        let mut writers: Vec<Option<u32>> = vec![None; plan.destinations.len()];
        let mut shared = vec![false; plan.destinations.len()];
        for op in &plan.ops {
            let (d, s) = (op.dst as usize, plan.sources[op.src as usize].sender);
            shared[d] |= writers[d].is_some_and(|w| w != s);
            writers[d] = Some(s);
        }
        loop {
            let Some(version) = self.group_begin(plan, &mut members)? else { continue };
            let started = Instant::now();
            let mut touched = vec![false; plan.destinations.len()];
            let mut report = UpdateReport { sender_digests: true, ..UpdateReport::default() };
            let mut digests = vec![None; plan.destinations.len()];
            let (mut compared, mut two_phase, mut failed) = (true, false, None);
            for (r, member) in members.iter_mut().enumerate() {
                let Established { conn, plan: share, transfer } = member;
                let (outcome, part) = transfer.run(self, conn, share, version, &[], &mut touched);
                report.bytes += part.bytes;
                report.buckets += part.buckets;
                report.unpack_seconds += part.unpack_seconds;
                match outcome {
                    Outcome::Verified { digests: ours, compared: c, two_phase: t } => {
                        // A share's digest of a destination it does not write (of no bytes)
                        // says nothing of the destination.
                        for (d, value) in ours.into_iter().enumerate() {
                            if value.is_some() && !shared[d] && writers[d] == Some(r as u32) {
                                digests[d] = value;
                            }
                        }
                        compared &= c;
                        two_phase |= r == 0 && t;
                    }
                    other => {
                        failed = Some(of_rank(other, r));
                        break;
                    }
                }
            }
            report.tensors = touched.iter().filter(|&&t| t).count();
            let outcome = failed.unwrap_or_else(|| {
                if let Store::Host(tensors) = &*self.store() {
                    for d in (0..shared.len()).filter(|&d| shared[d]) {
                        digests[d] = Some(digest::digest(tensors.bytes(d)));
                    }
                }
                // On a GPU the whole is not digested again (it would read those tensors a
                // second time): their digest is no longer known, so a later update sends them
                // whole.
                if digests.iter().zip(&shared).any(|(d, &s)| s && d.is_none()) {
                    let mut state = self.state();
                    (0..shared.len())
                        .filter(|&d| shared[d] && digests[d].is_none())
                        .for_each(|d| state.digests[d] = None);
                }
                Outcome::Verified { digests, compared, two_phase }
            });
            let outcome = match outcome {
                Outcome::Verified { two_phase: true, .. } => {
                    self.await_decision(&mut members[0].conn, version, outcome)
                }
                other => other,
            };
            let (report, _) = self.settle(plan, version, outcome, &touched, report, started);
            self.record(&report);
            for member in &mut members {
                // Best effort: a rank that broke its share may be gone already.
                let _ = member.conn.send(&Message::Report { report: report.clone() });
            }
            if !report.is_committed() {
                // The ranks after a failed share are mid-update: the group is done.
                return Err(ConnectionError::Refused(report.error.unwrap_or_default()));
            }
        }
    }

    /// Takes every rank's `Begin` of the next version; Some(version) once the version state
    /// took it and every rank was told, None when it was refused (every rank told why).
    fn group_begin(
        &self,
        plan: &Plan,
        members: &mut [Established],
    ) -> Result<Option<weightlift_core::Version>, ConnectionError> {
        let timeout = self.shared.options.timeout;
        let mut begins = Vec::with_capacity(members.len());
        for (r, member) in members.iter_mut().enumerate() {
            // Rank 0 may wait as long as training takes; the others follow it.
            let idle = if r == 0 { Duration::from_secs(24 * 3600) } else { timeout };
            match member.conn.recv(idle) {
                Ok(Message::Begin { version, skip }) => begins.push((version, skip)),
                Ok(other) => {
                    let reason = format!("trainer rank {r}: expected begin, got {}", other.name());
                    tell_all(members, &reason);
                    return Err(ConnectionError::Refused(reason));
                }
                // Rank 0 closing between versions is a trainer that is done.
                Err(ProtocolError::Closed) if r == 0 => {
                    tell_all(members, "trainer rank 0 closed its connection");
                    return Err(ProtocolError::Closed.into());
                }
                Err(e) => {
                    let reason = format!("trainer rank {r} did not begin the version: {e}");
                    tell_all(members, &reason);
                    return Err(ConnectionError::Refused(reason));
                }
            }
        }
        let version = begins[0].0;
        let refusal = if let Some((r, (v, _))) = begins.iter().enumerate().find(|(_, (v, _))| *v != version) {
            Some(format!("trainer rank {r} offers version {v} and rank 0 version {version}"))
        } else if let Some(r) = begins.iter().position(|(_, skip)| !skip.is_empty()) {
            Some(format!("trainer rank {r} asks to skip tensors: the ranks of a sharded trainer send them all"))
        } else if let Err(reason) = self.gate() {
            Some(format!("version {version} refused: {reason}"))
        } else {
            self.state().versions.begin(version).err().map(|e| e.to_string())
        };
        if let Some(reason) = refusal {
            tracing::info!(%version, "{reason}");
            for member in members.iter_mut() {
                member.conn.send(&Message::Refused { reason: reason.clone() })?;
            }
            return Ok(None);
        }
        for member in members.iter_mut() {
            if let Err(e) = member.conn.send(&Message::Accepted { version, stale: Vec::new() }) {
                // The version was begun: settle it as failed, nothing written.
                let outcome = Outcome::Broken(format!("accepting the update: {e}"));
                let untouched = vec![false; plan.destinations.len()];
                let (report, _) =
                    self.settle(plan, version, outcome, &untouched, UpdateReport::default(), Instant::now());
                self.record(&report);
                return Err(ConnectionError::Refused(report.error.unwrap_or_default()));
            }
        }
        Ok(Some(version))
    }
}

/// Tells every rank why the group ends, before its connection closes (best effort).
fn tell_all(members: &mut [Established], reason: &str) {
    for member in members {
        let _ = member.conn.send(&Message::Refused { reason: reason.to_string() });
    }
}

/// A rank's outcome as the group's, naming the rank.
fn of_rank(outcome: Outcome, rank: usize) -> Outcome {
    let named = |reason: String| format!("trainer rank {rank}: {reason}");
    match outcome {
        Outcome::Aborted(reason) => Outcome::Aborted(named(reason)),
        Outcome::Broken(reason) => Outcome::Broken(named(reason)),
        Outcome::Failed(reason) => Outcome::Failed(named(reason)),
        Outcome::Mismatch(names) => Outcome::ShareMismatch { rank, names },
        other => other,
    }
}
