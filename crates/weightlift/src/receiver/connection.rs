//! Serving one connection: its handshake, then its updates one by one, each from the sender's
//! begin (checked against the skip list, the write gate and the version state) through its
//! transfer and settling to the report sent back; and why a connection ends early.

use std::sync::Arc;
use std::time::{Duration, Instant};

use weightlift_core::VersionError;

use crate::net::Stream;
use crate::protocol::{Message, ProtocolError};
use crate::report::UpdateReport;
use crate::session::SessionError;
use crate::transport::{LocalRing, TransferError};

use super::handshake::{refuse, Established};
use super::settle::Outcome;
use super::{Expect, Receiver};

/// Why one connection ended early (logged; the receiver keeps serving).
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Version(VersionError),
}

impl Receiver {
    pub(super) fn handle_with(&self, stream: Stream, local_ring: Option<Arc<LocalRing>>) {
        let peer = stream.peer();
        match self.run_connection(stream, local_ring, None) {
            Ok(_) | Err(ConnectionError::Protocol(ProtocolError::Closed)) => {
                tracing::debug!(%peer, "connection closed")
            }
            Err(e) => tracing::warn!(%peer, "dropping connection: {e}"),
        }
    }

    /// Serves a connection's updates until it closes; with `expect` (a connection this
    /// receiver dialled), takes only that one update and returns its report.
    pub(super) fn run_connection(
        &self,
        stream: Stream,
        local_ring: Option<Arc<LocalRing>>,
        expect: Option<Expect>,
    ) -> Result<Option<UpdateReport>, ConnectionError> {
        let options = &self.shared.options;
        // Bound in the order the handshake made them, so they drop in reverse: the transfer
        // (and the memory it holds) before the connection.
        let mut greeted = self.greet(stream, expect)?;
        if greeted.hello.shard.is_some() {
            if expect.is_some() {
                let reason = "this receiver fetches from one sender, not a sharded trainer's ranks".to_string();
                return Err(refuse(&mut greeted.conn, reason));
            }
            return self.join_group(greeted).map(|()| None);
        }
        let Established { mut conn, plan, mut transfer } = self.handshake(greeted, local_ring)?;

        loop {
            // Between updates a sender may stay idle for as long as training takes; a sender
            // this receiver dialled brings its update now.
            let idle = if expect.is_some() { options.timeout } else { Duration::from_secs(24 * 3600) };
            let (version, skip) = match conn.recv(idle)? {
                Message::Begin { version, skip } => (version, skip),
                other => return Err(ProtocolError::Unexpected { expected: "begin", got: other.name().into() }.into()),
            };
            if let Some(&bad) = skip.iter().find(|&&d| d as usize >= self.shared.manifest.len()) {
                conn.send(&Message::Refused {
                    reason: format!("skip list names tensor index {bad}, which does not exist"),
                })?;
                continue;
            }
            if let Some(wanted) = expect.map(|e| e.version).filter(|&v| v != version) {
                let reason = format!("this receiver asked for version {wanted}, and the sender offers {version}");
                conn.send(&Message::Refused { reason: reason.clone() })?;
                return Err(ConnectionError::Refused(reason));
            }
            if let Err(reason) = self.gate() {
                let reason = format!("version {version} refused: {reason}");
                tracing::info!(%version, "{reason}");
                conn.send(&Message::Refused { reason: reason.clone() })?;
                if expect.is_some() {
                    return Err(ConnectionError::Refused(reason));
                }
                continue;
            }
            if let Err(e) = self.state().versions.begin(version) {
                tracing::info!(%version, "refused: {e}");
                conn.send(&Message::Refused { reason: e.to_string() })?;
                if expect.is_some() {
                    return Err(ConnectionError::Version(e));
                }
                continue;
            }
            // A tensor whose bytes the receiver no longer vouches for cannot be skipped.
            let stale: Vec<u32> = {
                let state = self.state();
                skip.iter().copied().filter(|&d| state.digests[d as usize].is_none()).collect()
            };
            let skip: Vec<u32> = skip.into_iter().filter(|d| !stale.contains(d)).collect();
            let started = Instant::now();
            let mut touched = vec![false; plan.destinations.len()];
            let (outcome, report) = match conn.send(&Message::Accepted { version, stale }) {
                Err(e) => (Outcome::Broken(format!("accepting the update: {e}")), UpdateReport::default()),
                Ok(()) => transfer.run(self, &mut conn, &plan, version, &skip, &mut touched),
            };
            let outcome = match outcome {
                Outcome::Verified { two_phase: true, .. } => self.await_decision(&mut conn, version, outcome),
                other => other,
            };
            let (report, in_sync) = self.settle(&plan, version, outcome, &touched, report, started);
            self.record(&report);
            // Best effort: a sender that broke the transfer may be gone already.
            let sent = conn.send(&Message::Report { report: report.clone() });
            if expect.is_some() {
                return Ok(Some(report));
            }
            if !in_sync {
                // The stream may be mid-message after a broken transfer: this connection is done.
                return Err(ConnectionError::Refused(report.error.unwrap_or_default()));
            }
            sent?;
        }
    }
}

impl Receiver {
    /// Logs a settled update's report, keeps it as the last one and tells the observers.
    pub(super) fn record(&self, report: &UpdateReport) {
        log_report(report);
        self.state().last_report = Some(report.clone());
        let observers = self.shared.observers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        observers.iter().for_each(|observe| observe(report));
    }
}

fn log_report(report: &UpdateReport) {
    if report.is_committed() {
        tracing::info!(
            version = %report.version,
            bytes = report.bytes,
            seconds = report.seconds,
            gbps = report.gbps,
            "update committed"
        );
    } else {
        tracing::warn!(
            version = %report.version,
            committed = %report.committed,
            dirty = report.dirty.len(),
            "update failed: {}",
            report.error.as_deref().unwrap_or("")
        );
    }
}
