//! The trainer side of a tensor-parallel engine: one sender per engine rank, and the
//! two-phase commit that makes one version land on every rank or on none.
//!
//! 1. Every receiver is asked to accept the version before any byte moves; if one refuses (or
//!    cannot be reached), the others are told to call it off, and nothing is written anywhere.
//! 2. The transfers run in parallel; each receiver verifies its digests and votes.
//! 3. Only when every receiver verified is every one told to commit; otherwise the ones that
//!    verified are told to call it off (their written tensors marked dirty).
//!
//! Over NCCL the receivers that take the same bytes (replicas, or the same rank of replicas at
//! one TP size) form a fan-out class fed by one communicator, every bucket broadcast once to
//! the class (see `nccl_buckets::fan_out_classes`); the classes run in parallel.
//!
//! A receiver that never hears the decision settles as failed, dirty, on its old version, when
//! its timeout passes; the report names it. An update of one receiver needs no vote: it
//! commits as soon as its digests match.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use weightlift_core::{Manifest, RuleSet, Version};

use weightlift_cuda::Gpu;

use crate::cuda_ipc::DeviceTensors;
use crate::nccl_buckets::fan_out_classes;
use crate::net::Endpoint;
use crate::protocol::{Shard, TransportKind};
use crate::report::{UpdateOutcome, UpdateReport};
use crate::sender::{ReceiverState, SendError, Sender, SenderOptions, Sources, Vote};
use crate::tensors::SourceTensors;

/// One version pushed to every rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub version: Version,
    /// Payload bytes over all ranks.
    pub bytes: u64,
    /// Wall time of the push as the trainer sees it, all ranks in parallel.
    pub seconds: f64,
    pub gbps: f64,
    /// Every rank committed the version with digests compared.
    pub verified: bool,
    /// Every rank committed the version.
    pub committed: bool,
    /// Each rank's report, in the order the receivers were given.
    pub ranks: Vec<UpdateReport>,
    /// Whom each report is from: the endpoint, or the peer that connected.
    pub receivers: Vec<String>,
}

impl StepReport {
    /// None when every rank committed; else what each rank did, naming every one.
    pub fn failure(&self) -> Option<String> {
        if self.committed {
            return None;
        }
        let ranks: Vec<String> = self.ranks.iter().zip(&self.receivers).map(|(r, who)| describe(r, who)).collect();
        Some(format!("version {} was not committed on every receiver: {}", self.version, ranks.join("; ")))
    }
}

/// GPU tensors over NCCL to every receiver: one transfer per fan-out class (`classes`: indices
/// into `senders`), the classes in parallel; each receiver's vote, in the order of `senders`.
fn fan_out(
    senders: &mut [Sender],
    classes: &[Vec<usize>],
    version: Version,
    gpu: &Gpu,
    tensors: &dyn DeviceTensors,
    two_phase: bool,
) -> Vec<Result<Vote, SendError>> {
    let mut unclassed: Vec<Option<&mut Sender>> = senders.iter_mut().map(Some).collect();
    let members: Vec<Vec<&mut Sender>> = classes
        .iter()
        .map(|class| class.iter().map(|&i| unclassed[i].take().expect("classes partition the senders")).collect())
        .collect();
    let voted: Vec<Vec<Result<Vote, SendError>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = members
            .into_iter()
            .map(|mut class| scope.spawn(move || Sender::transfer_nccl(&mut class, version, gpu, tensors, two_phase)))
            .collect();
        handles.into_iter().map(|h| h.join().expect("a push thread panicked")).collect()
    });
    let mut votes: Vec<Option<Result<Vote, SendError>>> = (0..senders.len()).map(|_| None).collect();
    for (class, voted) in classes.iter().zip(voted) {
        for (&i, vote) in class.iter().zip(voted) {
            votes[i] = Some(vote);
        }
    }
    votes.into_iter().map(|v| v.expect("a vote from every receiver")).collect()
}

fn describe(report: &UpdateReport, who: &str) -> String {
    let outcome = match report.outcome {
        UpdateOutcome::Committed => return format!("{who}: committed version {}", report.version),
        UpdateOutcome::Refused => "refused it",
        UpdateOutcome::Aborted => "called off",
        UpdateOutcome::Failed => "failed",
    };
    let dirty = match report.dirty.len() {
        0 => String::new(),
        n => format!(", {n} tensor(s) dirty"),
    };
    let error = report.error.as_deref().unwrap_or("no reason given");
    format!("{who}: {outcome}, still on version {}{dirty}: {error}", report.committed)
}

/// Senders to every rank of one engine.
pub struct Trainer {
    senders: Vec<Sender>,
    /// The NCCL fan-out classes of the senders' receivers, found at the first NCCL push (the
    /// plans are fixed from connect on).
    classes: Option<Vec<Vec<usize>>>,
}

impl Trainer {
    /// Connects to each rank's receiver (in rank order or not: each receiver knows its rank).
    pub fn connect(
        endpoints: &[Endpoint],
        source: &Manifest,
        rules: &RuleSet,
        options: &SenderOptions,
    ) -> Result<Trainer, SendError> {
        Trainer::connect_each(endpoints, |e| Sender::connect(e, source, rules, options.clone()))
    }

    /// Connects as one rank of a sharded trainer (`shard`) to each rank's receiver: the
    /// trainer's ranks each do so with their own pieces, and rank 0's decides every version.
    pub fn connect_shard(
        endpoints: &[Endpoint],
        source: &Manifest,
        rules: &RuleSet,
        options: &SenderOptions,
        shard: &Shard,
    ) -> Result<Trainer, SendError> {
        Trainer::connect_each(endpoints, |e| Sender::connect_shard(e, source, rules, options.clone(), shard.clone()))
    }

    fn connect_each(
        endpoints: &[Endpoint],
        connect: impl Fn(&Endpoint) -> Result<Sender, SendError>,
    ) -> Result<Trainer, SendError> {
        let senders = endpoints.iter().map(connect).collect::<Result<Vec<_>, _>>()?;
        Ok(Trainer { senders, classes: None })
    }

    /// Senders already connected (e.g. to in-process receivers).
    pub fn from_senders(senders: Vec<Sender>) -> Trainer {
        Trainer { senders, classes: None }
    }

    pub fn senders(&self) -> &[Sender] {
        &self.senders
    }

    /// Each rank's receiver as it was when this trainer connected.
    pub fn receivers_at_connect(&self) -> Vec<ReceiverState> {
        self.senders.iter().map(|s| s.receiver_at_connect().clone()).collect()
    }

    /// Pushes `version` to every rank, committed on all of them or on none. Errs only for
    /// tensors that do not match the manifest connected with (before anything is sent); every
    /// other failure is in the report (`committed` false, [`StepReport::failure`]).
    pub fn push(&mut self, version: Version, tensors: &dyn SourceTensors) -> Result<StepReport, SendError> {
        self.push_sources(version, Sources::Host(tensors))
    }

    /// Pushes GPU tensors (on `gpu`) as `version` to every rank, as [`Trainer::push`].
    pub fn push_device(
        &mut self,
        version: Version,
        gpu: &Gpu,
        tensors: &dyn DeviceTensors,
    ) -> Result<StepReport, SendError> {
        self.push_sources(version, Sources::Device { gpu, tensors })
    }

    /// Pushes `sources` as `version` to every rank, as [`Trainer::push`].
    pub fn push_sources(&mut self, version: Version, sources: Sources<'_>) -> Result<StepReport, SendError> {
        let skips = self.senders.iter().map(|s| s.skip_for(sources)).collect::<Result<Vec<_>, _>>()?;
        let nccl = self.senders.iter().all(|s| s.transport() == TransportKind::Nccl);
        if nccl && self.classes.is_none() {
            self.classes = Some(fan_out_classes(&self.senders.iter().map(Sender::plan).collect::<Vec<_>>()));
        }
        let classes = self.classes.clone();
        Ok(self.run(version, skips, |senders, skips, two_phase| match (sources, &classes) {
            (Sources::Device { gpu, tensors }, Some(classes)) if nccl => {
                fan_out(senders, classes, version, gpu, tensors, two_phase)
            }
            _ => std::thread::scope(|scope| {
                let handles: Vec<_> = senders
                    .iter_mut()
                    .zip(skips)
                    .map(|(s, skip)| scope.spawn(move || s.transfer(version, skip, sources, two_phase)))
                    .collect();
                handles.into_iter().map(|h| h.join().expect("a push thread panicked")).collect()
            }),
        }))
    }

    /// The two-phase push of `version`; `transfer` moves the bytes to every receiver (each
    /// with what it may skip) and returns each one's vote, in order.
    fn run(
        &mut self,
        version: Version,
        skips: Vec<Vec<u32>>,
        transfer: impl FnOnce(&mut [Sender], &[Vec<u32>], bool) -> Vec<Result<Vote, SendError>>,
    ) -> StepReport {
        let started = Instant::now();
        let two_phase = self.senders.len() > 1;
        let failed = |sender: &Sender, e: SendError| match e {
            SendError::Refused { reason, .. } => sender.report_for(version, UpdateOutcome::Refused, reason),
            other => sender.report_for(version, UpdateOutcome::Failed, other.to_string()),
        };

        // 1. Every receiver accepts before any byte moves.
        let asked: Vec<Result<(), SendError>> =
            self.senders.iter_mut().zip(&skips).map(|(s, skip)| s.send_begin(version, skip)).collect();
        let begun: Vec<Result<Vec<u32>, SendError>> = self
            .senders
            .iter_mut()
            .zip(asked)
            .zip(skips)
            .map(|((s, asked), skip)| asked.and_then(|()| s.accepted(version, skip)))
            .collect();
        if let Some(reason) = self.first_failure(version, begun.iter().map(|b| b.as_ref().err())) {
            let ranks = self
                .senders
                .iter_mut()
                .zip(begun)
                .map(|(s, begun)| match begun {
                    Ok(_) => s.abort(&reason).unwrap_or_else(|e| failed(s, e)),
                    Err(e) => failed(s, e),
                })
                .collect();
            return self.step(version, started, ranks);
        }

        // 2. The transfers, in parallel; each receiver verifies and votes.
        let skips: Vec<Vec<u32>> = begun.into_iter().map(Result::unwrap_or_default).collect();
        let votes = transfer(&mut self.senders, &skips, two_phase);

        // 3. Commit where every receiver verified, else call it off where one did.
        let problem = votes.iter().enumerate().find_map(|(i, vote)| match vote {
            Ok(Vote::Verified) => None,
            Ok(Vote::Settled(report)) if report.is_committed() => None,
            Ok(Vote::Settled(report)) => Some(describe(report, &self.who(i))),
            Err(e) => Some(format!("{}: {e}", self.who(i))),
        });
        let decision = match &problem {
            None => Ok(()),
            Some(problem) => Err(format!("version {version} failed on another receiver: {problem}")),
        };
        // A sharded trainer's ranks past 0 leave the decision to rank 0: the receiver settles
        // on its word and reports to every rank.
        let decided: Vec<Result<(), SendError>> = self
            .senders
            .iter_mut()
            .zip(&votes)
            .map(|(s, vote)| match vote {
                Ok(Vote::Verified) if s.coordinates() => {
                    s.send_decision(decision.as_ref().map(|_| ()).map_err(String::as_str))
                }
                _ => Ok(()),
            })
            .collect();
        let ranks = self
            .senders
            .iter_mut()
            .zip(votes)
            .zip(decided)
            .map(|((s, vote), decided)| match vote {
                Ok(Vote::Verified) => decided.and_then(|()| s.await_settled()).unwrap_or_else(|e| failed(s, e)),
                Ok(Vote::Settled(report)) => *report,
                Err(e) => failed(s, e),
            })
            .collect();
        self.step(version, started, ranks)
    }

    /// Why the update cannot go on, naming the first receiver that refused or failed it.
    fn first_failure<'a>(
        &self,
        version: Version,
        errors: impl Iterator<Item = Option<&'a SendError>>,
    ) -> Option<String> {
        errors.enumerate().find_map(|(i, error)| {
            error.map(|e| match e {
                SendError::Refused { reason, .. } => format!("{} refused version {version}: {reason}", self.who(i)),
                other => format!("{} could not begin version {version}: {other}", self.who(i)),
            })
        })
    }

    /// Receiver `i` by its rank and peer, and by its place among the receivers where that
    /// alone does not tell it apart (a main model and its draft, both rank 0 in-process).
    fn who(&self, i: usize) -> String {
        let name = self.senders[i].name();
        match self.senders.iter().filter(|s| s.name() == name).count() {
            1 => name,
            _ => format!("receiver {} ({name})", i + 1),
        }
    }

    fn step(&self, version: Version, started: Instant, ranks: Vec<UpdateReport>) -> StepReport {
        let seconds = started.elapsed().as_secs_f64();
        let bytes = ranks.iter().map(|r| r.bytes).sum();
        StepReport {
            version,
            bytes,
            seconds,
            gbps: bytes as f64 / seconds.max(1e-9) / 1e9,
            verified: ranks.iter().all(|r| r.is_committed() && r.verified),
            committed: ranks.iter().all(UpdateReport::is_committed),
            ranks,
            receivers: (0..self.senders.len()).map(|i| self.who(i)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use weightlift_core::{destination_manifest, synthetic, PresetOptions, SourceSet, TpRank};

    use super::*;
    use crate::{Fault, HostTensors, Receiver, ReceiverOptions};

    /// What one rank does wrong in a group update.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Misstep {
        None,
        /// Its receiver is ahead: it refuses the version at begin.
        Ahead,
        /// Its sender hangs up after this many buckets (mid transfer).
        HangUp(u32),
        /// A byte of this bucket is flipped (fails at verification).
        Flip(u32),
        /// Its sender never sends it the commit.
        WithholdCommit,
    }

    fn misstep() -> impl Strategy<Value = Misstep> {
        prop_oneof![
            4 => Just(Misstep::None),
            1 => Just(Misstep::Ahead),
            1 => (0u32..4).prop_map(Misstep::HangUp),
            1 => (0u32..4).prop_map(Misstep::Flip),
            1 => Just(Misstep::WithholdCommit),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// After a group update every rank is on the new version, clean, or on its old one,
        /// dirty exactly where it was written; no rank commits unless every rank verified, and
        /// the only ranks left behind then are those that never heard the commit.
        #[test]
        fn a_group_update_commits_on_every_rank_or_on_none(missteps in prop_oneof![
            proptest::collection::vec(misstep(), 2), proptest::collection::vec(misstep(), 4)
        ]) {
            let config = synthetic("qwen3-tiny").unwrap();
            let rules = config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
            let source = config.source_manifest();
            let n = missteps.len() as u32;
            let mut receivers = Vec::new();
            let mut senders = Vec::new();
            for (rank, misstep) in missteps.iter().enumerate() {
                let tp = TpRank::new(rank as u32, n).unwrap();
                let dest = destination_manifest(&SourceSet::single(source.clone()), &rules, tp, None, false).unwrap();
                let initial = if *misstep == Misstep::Ahead { Version(10) } else { Version(0) };
                let options = ReceiverOptions { tp, initial_version: initial, timeout: Duration::from_millis(300), ..ReceiverOptions::default() };
                let receiver = Receiver::new(HostTensors::filled(dest, 0), options);
                let fault = match *misstep {
                    Misstep::HangUp(k) => Some(Fault::HangUpAfterBuckets(k)),
                    Misstep::Flip(k) => Some(Fault::FlipByteInBucket(k)),
                    Misstep::WithholdCommit => Some(Fault::WithholdCommit),
                    Misstep::None | Misstep::Ahead => None,
                };
                let options = SenderOptions { bucket_bytes: 4096, fault, timeout: Duration::from_secs(5), ..SenderOptions::default() };
                senders.push(receiver.connect_in_process(&source, &rules, options).unwrap());
                receivers.push((receiver, initial));
            }
            let mut trainer = Trainer::from_senders(senders);
            let tensors = HostTensors::synthetic(&config, 3);
            let step = trainer.push(Version(1), &tensors).unwrap();

            let refused = missteps.contains(&Misstep::Ahead);
            let failed = missteps.iter().any(|m| matches!(m, Misstep::HangUp(_) | Misstep::Flip(_)));
            for ((receiver, initial), (misstep, report)) in receivers.iter().zip(missteps.iter().zip(&step.ranks)) {
                // A rank whose sender hung up settles on its own thread, maybe after the push
                // returned: it must, well within its timeout's few multiples.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                let mut status = receiver.status();
                while status.in_flight.is_some() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                    status = receiver.status();
                }
                prop_assert_eq!(status.in_flight, None, "every rank settled");
                let on_new = status.committed == Version(1);
                prop_assert!(on_new || status.committed == *initial);
                prop_assert_eq!(on_new, report.is_committed());
                if on_new {
                    prop_assert!(status.dirty.is_empty(), "committed and dirty: {:?}", report);
                }
                if refused || failed {
                    prop_assert!(!on_new, "a rank committed although another refused or failed: {:?}", step);
                }
                // Nothing is written before every rank accepted, or by a sender that hung up
                // before its first bucket.
                let written = !refused && *misstep != Misstep::HangUp(0);
                prop_assert_eq!(!status.dirty.is_empty(), written && !on_new, "{:?}: {:?}", misstep, report);
                let expected = match misstep {
                    Misstep::Ahead => UpdateOutcome::Refused,
                    _ if refused => UpdateOutcome::Aborted,
                    Misstep::HangUp(_) | Misstep::Flip(_) => UpdateOutcome::Failed,
                    _ if failed => UpdateOutcome::Aborted,
                    Misstep::WithholdCommit => UpdateOutcome::Failed,
                    Misstep::None => UpdateOutcome::Committed,
                };
                prop_assert_eq!(report.outcome, expected, "{:?}: {:?}", misstep, report);
            }
            prop_assert_eq!(step.committed, missteps.iter().all(|m| *m == Misstep::None));
            // The failure names every rank.
            if let Some(failure) = step.failure() {
                for rank in 0..n {
                    prop_assert!(failure.contains(&format!("rank {rank} at in-process")), "{}", failure);
                }
            }
        }
    }
}
