//! The agent's Prometheus metrics: updates, bytes, durations, failures by reason, paused bytes.

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::report::UpdateReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Tag {
    tag: String,
}

pub struct Metrics {
    registry: Registry,
    updates: Family<Outcome, Counter>,
    bytes: Counter,
    seconds: Histogram,
    failures: Family<Reason, Counter>,
    committed: Gauge,
    paused: Family<Tag, Gauge>,
}

/// Why an update was not committed, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// Another update was running.
    Busy,
    /// The version was not above the committed one.
    StaleVersion,
    /// The weights' memory was released.
    Paused,
    /// The source cannot be planned onto this engine or read.
    BadSource,
    /// The sender could not be reached or offered something else.
    Fetch,
    /// Digests differed from the sender's.
    DigestMismatch,
    /// The transfer broke off.
    Transfer,
    /// An update from disk was given up at its deadline, before it wrote anything.
    Deadline,
}

impl FailureReason {
    fn label(self) -> &'static str {
        match self {
            FailureReason::Busy => "busy",
            FailureReason::StaleVersion => "stale_version",
            FailureReason::Paused => "paused",
            FailureReason::BadSource => "bad_source",
            FailureReason::Fetch => "fetch",
            FailureReason::DigestMismatch => "digest_mismatch",
            FailureReason::Transfer => "transfer",
            FailureReason::Deadline => "deadline",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("weightlift");
        let updates = Family::<Outcome, Counter>::default();
        let bytes = Counter::default();
        let seconds = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let failures = Family::<Reason, Counter>::default();
        let committed = Gauge::default();
        let paused = Family::<Tag, Gauge>::default();
        registry.register("updates", "Updates settled, by outcome (committed or failed)", updates.clone());
        registry.register("update_bytes", "Payload bytes of committed updates", bytes.clone());
        registry.register("update_duration_seconds", "Seconds per settled update, on the receiver", seconds.clone());
        registry.register("update_failures", "Updates refused or failed, by reason", failures.clone());
        registry.register("committed_version", "The committed weight version", committed.clone());
        registry.register("paused_bytes", "Bytes of GPU memory released, by tag", paused.clone());
        Metrics { registry, updates, bytes, seconds, failures, committed, paused }
    }
}

impl Metrics {
    /// An update a receiver settled (from any connection).
    pub fn settled(&self, report: &UpdateReport) {
        let outcome = if report.is_committed() { "committed" } else { "failed" };
        self.updates.get_or_create(&Outcome { outcome }).inc();
        self.seconds.observe(report.seconds);
        if report.is_committed() {
            self.bytes.inc_by(report.bytes);
        } else {
            let reason =
                if report.mismatched.is_empty() { FailureReason::Transfer } else { FailureReason::DigestMismatch };
            self.failed(reason);
        }
        self.committed.set(report.committed.0 as i64);
    }

    /// An update refused before it started, or one that never reached the receiver.
    pub fn failed(&self, reason: FailureReason) {
        self.failures.get_or_create(&Reason { reason: reason.label() }).inc();
    }

    /// The exposition text, with the committed version and paused bytes as they are now.
    pub fn render(&self, committed: u64, paused: &[(String, u64)]) -> String {
        self.committed.set(committed as i64);
        for (tag, bytes) in paused {
            self.paused.get_or_create(&Tag { tag: tag.clone() }).set(*bytes as i64);
        }
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
