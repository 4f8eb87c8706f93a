//! The version state machine's side of an update: how the update ended ([`Outcome`]), the
//! sender's decision on a two-phase update, and settling the version state (commit with the
//! new digests, or fail marking dirty every tensor the update touched) into its report.

use std::time::Instant;

use weightlift_core::{Plan, Version};

use crate::protocol::{Conn, Message, ProtocolError};
use crate::report::{peak_rss_bytes, UpdateOutcome, UpdateReport};

use super::Receiver;

impl Receiver {
    /// Two-phase: tells the sender every tensor verified and waits, up to the update timeout,
    /// for its decision. Without a commit the update fails (the bytes written are dirty).
    pub(super) fn await_decision(&self, conn: &mut Conn, version: Version, verified: Outcome) -> Outcome {
        if let Err(e) = conn.send(&Message::Verified { version }) {
            return Outcome::Broken(format!("telling the sender version {version} verified: {e}"));
        }
        match conn.recv(self.shared.options.timeout) {
            Ok(Message::Commit { version: v }) if v == version => verified,
            Ok(Message::Abort { reason }) => Outcome::called_off(reason),
            Ok(other) => {
                Outcome::Broken(format!("expected the sender's decision on version {version}, got {}", other.name()))
            }
            Err(ProtocolError::Timeout(waited)) => {
                Outcome::Broken(format!("no commit of version {version} from the sender within {waited:.1?}"))
            }
            Err(e) => Outcome::Broken(format!("waiting for the sender's decision on version {version}: {e}")),
        }
    }

    /// Settles the version state after an update (commit, or fail marking what it touched
    /// dirty) and completes its report. Also says whether the connection is still in step
    /// (false after a broken transfer).
    pub(super) fn settle(
        &self,
        plan: &Plan,
        version: Version,
        outcome: Outcome,
        touched: &[bool],
        mut report: UpdateReport,
        started: Instant,
    ) -> (UpdateReport, bool) {
        report.version = version;
        // A quantized weight's scales are written with it: dirty with it.
        let mut touched = touched.to_vec();
        for s in &plan.scaled {
            touched[s.scale as usize] |= touched[s.weight as usize];
        }
        let mut state = self.state();
        let in_sync = !matches!(outcome, Outcome::Broken(_));
        let (outcome, reason) = match outcome {
            Outcome::Verified { digests, compared, .. } => {
                state.versions.commit(version).expect("this connection holds the update in flight");
                // A streaming receiver keeps no bytes between updates: nothing to vouch for.
                let kept = if self.shared.stream.is_some() { Vec::new() } else { digests };
                for (d, value) in kept.into_iter().enumerate() {
                    if value.is_some() {
                        state.digests[d] = value;
                    }
                }
                report.verified = compared;
                self.shared.committed.notify_all();
                (UpdateOutcome::Committed, None)
            }
            Outcome::Mismatch(names) => (UpdateOutcome::Failed, Some(mismatch(&mut report, names, ""))),
            Outcome::ShareMismatch { rank, names } => {
                let within = format!(" in trainer rank {rank}'s share");
                (UpdateOutcome::Failed, Some(mismatch(&mut report, names, &within)))
            }
            Outcome::Aborted(reason) => (UpdateOutcome::Aborted, Some(reason)),
            Outcome::Broken(reason) | Outcome::Failed(reason) => (UpdateOutcome::Failed, Some(reason)),
        };
        report.outcome = outcome;
        if let Some(reason) = reason {
            // Every tensor this update touched may now hold neither version's bytes; for a
            // streaming receiver, every tensor its engine was handed (and may have loaded).
            let dirty: Vec<String> = match &self.shared.stream {
                Some(stream) => stream.handoff.handed_names(),
                None => (0..touched.len())
                    .filter(|&d| touched[d])
                    .map(|d| {
                        state.digests[d] = None;
                        plan.destinations[d].name.clone()
                    })
                    .collect(),
            };
            state.versions.fail(version, reason.clone(), dirty).expect("this connection holds the update in flight");
            report.error = Some(reason);
        }
        if let Some(stream) = &self.shared.stream {
            stream.handoff.settle(version, report.error.clone());
        }
        report.committed = state.versions.committed();
        report.dirty = state.versions.dirty().iter().cloned().collect();
        report.seconds = started.elapsed().as_secs_f64();
        report.gbps = report.bytes as f64 / report.seconds.max(1e-9) / 1e9;
        report.receiver_peak_rss = peak_rss_bytes();
        (report, in_sync)
    }
}

/// Records the tensors whose digests differed in `report`; the reason, naming them.
fn mismatch(report: &mut UpdateReport, names: Vec<String>, within: &str) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    report.mismatched = names;
    format!("digest mismatch{within}: {}", quoted.join(", "))
}

/// How an update ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Every written tensor matched the sender's digest (`compared`), or, with nothing to
    /// compare with, was recorded as written; the receiver's digest of each. `two_phase`: the
    /// sender decides whether it commits.
    Verified { digests: Vec<Option<u64>>, compared: bool, two_phase: bool },
    /// The transfer completed but these tensors' digests differ from the sender's.
    Mismatch(Vec<String>),
    /// A sharded trainer's rank `rank` sent a share whose digests differ for these tensors.
    ShareMismatch { rank: usize, names: Vec<String> },
    /// The sender called the update off, in step with this side.
    Aborted(String),
    /// The transfer broke off (sender gone, stalled, or out of protocol).
    Broken(String),
    /// The update failed on this side while its bytes kept coming, so the connection is still
    /// in step (a streaming receiver's engine gave up, say).
    Failed(String),
}

impl Outcome {
    /// The sender's `Abort`, with its reason.
    pub(super) fn called_off(reason: String) -> Outcome {
        Outcome::Aborted(format!("the sender called the update off: {reason}"))
    }
}
