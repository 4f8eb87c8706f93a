//! The receiver's update-version state machine: which version it reports, which update is in
//! flight, and which tensors a failed update may have left damaged.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A weights version. Updates only ever move the committed version forward.
/// Version 0 is the weights an engine starts with, before any update.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Version(pub u64);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where the receiver is in its update cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Nothing attempted since start.
    Idle,
    Receiving {
        incoming: Version,
    },
    Verifying {
        incoming: Version,
    },
    /// The last update committed.
    Committed,
    Failed {
        attempted: Version,
        reason: String,
    },
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Idle => write!(f, "idle"),
            Phase::Receiving { incoming } => write!(f, "receiving version {incoming}"),
            Phase::Verifying { incoming } => write!(f, "verifying version {incoming}"),
            Phase::Committed => write!(f, "committed"),
            Phase::Failed { attempted, reason } => {
                write!(f, "failed at version {attempted}: {reason}")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("version {offered} is stale: the receiver has already committed version {committed}")]
    Stale { offered: Version, committed: Version },
    #[error("update to version {version} refused: the receiver has already committed it")]
    Duplicate { version: Version },
    #[error("update to version {offered} refused: version {in_flight} is still in flight")]
    Concurrent { in_flight: Version, offered: Version },
    #[error("cannot {action} version {version}: {}, but the receiver is {phase}", expectation(.action))]
    Unexpected { action: &'static str, version: Version, phase: String },
}

/// What each step requires, so an `Unexpected` error explains itself.
fn expectation(action: &str) -> &'static str {
    match action {
        "verify" => "only the version being received can be verified",
        "commit" => "only the version being verified can be committed",
        "fail" => "only the version in flight can be failed",
        _ => "the step does not match the update in flight",
    }
}

/// The receiver's version bookkeeping. Every method that returns `Err` leaves it unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionState {
    committed: Version,
    phase: Phase,
    dirty: BTreeSet<String>,
}

impl VersionState {
    /// Idle at `initial` (e.g. the weights the engine loaded).
    pub fn new(initial: Version) -> Self {
        VersionState { committed: initial, phase: Phase::Idle, dirty: BTreeSet::new() }
    }

    /// The version the receiver reports; never changes on failure.
    pub fn committed(&self) -> Version {
        self.committed
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Names whose bytes may differ from `committed` after a failed update.
    pub fn dirty(&self) -> &BTreeSet<String> {
        &self.dirty
    }

    pub fn in_flight(&self) -> Option<Version> {
        match self.phase {
            Phase::Receiving { incoming } | Phase::Verifying { incoming } => Some(incoming),
            Phase::Idle | Phase::Committed | Phase::Failed { .. } => None,
        }
    }

    /// Start receiving `offered`. Allowed from Idle, Committed or Failed (a retry may reuse the
    /// failed version) as long as `offered` is newer than the committed version.
    pub fn begin(&mut self, offered: Version) -> Result<(), VersionError> {
        // One update at a time: a second sender must not interleave writes with the first.
        if let Some(in_flight) = self.in_flight() {
            return Err(VersionError::Concurrent { in_flight, offered });
        }
        if offered < self.committed {
            return Err(VersionError::Stale { offered, committed: self.committed });
        }
        if offered == self.committed {
            return Err(VersionError::Duplicate { version: offered });
        }
        self.phase = Phase::Receiving { incoming: offered };
        Ok(())
    }

    /// All bytes of `version` have arrived; check them.
    pub fn verify(&mut self, version: Version) -> Result<(), VersionError> {
        match self.phase {
            Phase::Receiving { incoming } if incoming == version => {
                self.phase = Phase::Verifying { incoming };
                Ok(())
            }
            _ => Err(self.unexpected("verify", version)),
        }
    }

    /// `version` verified: it becomes the committed version.
    pub fn commit(&mut self, version: Version) -> Result<(), VersionError> {
        match self.phase {
            Phase::Verifying { incoming } if incoming == version => {
                self.committed = version;
                self.phase = Phase::Committed;
                // Every tensor was just rewritten and verified, so earlier damage is gone.
                self.dirty.clear();
                Ok(())
            }
            _ => Err(self.unexpected("commit", version)),
        }
    }

    /// The update to `version` failed. The committed version stays; `dirty` names are added to
    /// those already recorded, because a failed retry does not repair earlier damage.
    pub fn fail(
        &mut self,
        version: Version,
        reason: impl Into<String>,
        dirty: impl IntoIterator<Item = String>,
    ) -> Result<(), VersionError> {
        if self.in_flight() != Some(version) {
            return Err(self.unexpected("fail", version));
        }
        self.phase = Phase::Failed { attempted: version, reason: reason.into() };
        self.dirty.extend(dirty);
        Ok(())
    }

    /// Something outside an update changed these tensors (a checker poisoning them on
    /// purpose): they stay dirty until the next commit rewrites them.
    pub fn mark_dirty(&mut self, names: impl IntoIterator<Item = String>) {
        self.dirty.extend(names);
    }

    fn unexpected(&self, action: &'static str, version: Version) -> VersionError {
        VersionError::Unexpected { action, version, phase: self.phase.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn owned(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn happy_path_over_three_versions() {
        let mut s = VersionState::new(Version(0));
        assert_eq!(s.phase(), &Phase::Idle);
        assert_eq!(s.in_flight(), None);
        for v in 1..=3 {
            let v = Version(v);
            s.begin(v).unwrap();
            assert_eq!(s.phase(), &Phase::Receiving { incoming: v });
            assert_eq!(s.in_flight(), Some(v));
            s.verify(v).unwrap();
            assert_eq!(s.phase(), &Phase::Verifying { incoming: v });
            assert_eq!(s.committed(), Version(v.0 - 1));
            s.commit(v).unwrap();
            assert_eq!(s.phase(), &Phase::Committed);
            assert_eq!(s.committed(), v);
            assert_eq!(s.in_flight(), None);
            assert!(!s.is_dirty());
        }
    }

    #[test]
    fn stale_offer_is_refused() {
        let mut s = VersionState::new(Version(5));
        let err = s.begin(Version(3)).unwrap_err();
        assert_eq!(err, VersionError::Stale { offered: Version(3), committed: Version(5) });
        assert_eq!(err.to_string(), "version 3 is stale: the receiver has already committed version 5");
        assert_eq!(s, VersionState::new(Version(5)));
    }

    #[test]
    fn duplicate_offer_is_refused() {
        let mut s = VersionState::new(Version(5));
        let err = s.begin(Version(5)).unwrap_err();
        assert_eq!(err, VersionError::Duplicate { version: Version(5) });
        assert_eq!(err.to_string(), "update to version 5 refused: the receiver has already committed it");
    }

    #[test]
    fn concurrent_offer_is_refused_before_other_checks() {
        let mut s = VersionState::new(Version(5));
        s.begin(Version(6)).unwrap();
        let before = s.clone();
        let err = s.begin(Version(7)).unwrap_err();
        assert_eq!(err.to_string(), "update to version 7 refused: version 6 is still in flight");
        // Even a stale offer reports the in-flight update first.
        s.verify(Version(6)).unwrap();
        let err = s.begin(Version(2)).unwrap_err();
        assert_eq!(err, VersionError::Concurrent { in_flight: Version(6), offered: Version(2) });
        assert_ne!(s, before);
    }

    #[test]
    fn failure_keeps_committed_and_retry_clears_dirty() {
        let mut s = VersionState::new(Version(1));
        s.begin(Version(2)).unwrap();
        s.fail(Version(2), "link dropped", owned(&["a.weight", "b.bias"])).unwrap();
        assert_eq!(s.committed(), Version(1));
        assert_eq!(s.phase(), &Phase::Failed { attempted: Version(2), reason: "link dropped".into() });
        assert_eq!(s.phase().to_string(), "failed at version 2: link dropped");
        assert!(s.is_dirty());
        assert_eq!(s.dirty(), &names(&["a.weight", "b.bias"]));

        // Retrying the very version that failed is allowed.
        s.begin(Version(2)).unwrap();
        assert!(s.is_dirty(), "dirt stays until a commit rewrites everything");
        s.verify(Version(2)).unwrap();
        s.commit(Version(2)).unwrap();
        assert_eq!(s.committed(), Version(2));
        assert!(!s.is_dirty());
    }

    #[test]
    fn failures_accumulate_dirty_names() {
        let mut s = VersionState::new(Version(1));
        s.begin(Version(2)).unwrap();
        s.fail(Version(2), "first", owned(&["a", "b"])).unwrap();
        s.begin(Version(3)).unwrap();
        s.verify(Version(3)).unwrap();
        s.fail(Version(3), "digest mismatch", owned(&["b", "c"])).unwrap();
        assert_eq!(s.dirty(), &names(&["a", "b", "c"]));
        assert_eq!(s.committed(), Version(1));
    }

    #[test]
    fn wrong_version_or_phase_is_rejected_unchanged() {
        let mut s = VersionState::new(Version(1));
        let err = s.verify(Version(2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot verify version 2: only the version being received can be verified, \
             but the receiver is idle"
        );

        s.begin(Version(4)).unwrap();
        let before = s.clone();
        let err = s.verify(Version(3)).unwrap_err();
        assert_eq!(
            err,
            VersionError::Unexpected { action: "verify", version: Version(3), phase: "receiving version 4".into() }
        );
        assert_eq!(s, before);
        let err = s.commit(Version(4)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot commit version 4: only the version being verified can be committed, \
             but the receiver is receiving version 4"
        );
        assert_eq!(s, before);

        s.verify(Version(4)).unwrap();
        let before = s.clone();
        assert!(s.commit(Version(5)).is_err());
        let err = s.fail(Version(5), "x", owned(&["a"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot fail version 5: only the version in flight can be failed, \
             but the receiver is verifying version 4"
        );
        assert_eq!(s, before);
        assert!(!s.is_dirty());
    }

    #[test]
    fn display_and_serde() {
        assert_eq!(Phase::Idle.to_string(), "idle");
        assert_eq!(Phase::Receiving { incoming: Version(4) }.to_string(), "receiving version 4");
        assert_eq!(Phase::Committed.to_string(), "committed");
        assert_eq!(Version(42).to_string(), "42");
        assert_eq!(serde_json::to_string(&Version(42)).unwrap(), "42");
        assert_eq!(serde_json::from_str::<Version>("7").unwrap(), Version(7));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Begin(u64),
        Verify(u64),
        Commit(u64),
        Fail(u64, Vec<String>),
    }

    fn op() -> impl Strategy<Value = Op> {
        let v = 0u64..6;
        prop_oneof![
            v.clone().prop_map(Op::Begin),
            v.clone().prop_map(Op::Verify),
            v.clone().prop_map(Op::Commit),
            (v, proptest::collection::vec("[a-d]", 0..3)).prop_map(|(v, n)| Op::Fail(v, n)),
        ]
    }

    proptest! {
        #[test]
        fn random_operations_keep_invariants(
            initial in 0u64..3,
            ops in proptest::collection::vec(op(), 0..40),
        ) {
            let mut s = VersionState::new(Version(initial));
            for op in ops {
                let before = s.clone();
                let result = match &op {
                    Op::Begin(v) => s.begin(Version(*v)),
                    Op::Verify(v) => s.verify(Version(*v)),
                    Op::Commit(v) => s.commit(Version(*v)),
                    Op::Fail(v, n) => s.fail(Version(*v), "boom", n.clone()),
                };

                prop_assert!(s.committed() >= before.committed());
                match (&op, &result) {
                    (_, Err(_)) => prop_assert_eq!(&s, &before),
                    (Op::Commit(v), Ok(())) => {
                        prop_assert_eq!(s.committed(), Version(*v));
                        prop_assert!(s.committed() > before.committed());
                        prop_assert!(s.dirty().is_empty());
                        prop_assert_eq!(s.phase(), &Phase::Committed);
                    }
                    (Op::Fail(_, n), Ok(())) => {
                        prop_assert_eq!(s.committed(), before.committed());
                        prop_assert!(s.dirty().is_superset(before.dirty()));
                        prop_assert!(n.iter().all(|name| s.dirty().contains(name)));
                    }
                    (_, Ok(())) => {
                        prop_assert_eq!(s.committed(), before.committed());
                        prop_assert_eq!(s.dirty(), before.dirty());
                    }
                }
                // begin succeeds exactly when nothing is in flight and the offer is newer.
                if let Op::Begin(v) = op {
                    let allowed = before.in_flight().is_none() && Version(v) > before.committed();
                    prop_assert_eq!(result.is_ok(), allowed);
                }
                let moving = matches!(s.phase(), Phase::Receiving { .. } | Phase::Verifying { .. });
                prop_assert_eq!(s.in_flight().is_some(), moving);
                prop_assert_eq!(s.is_dirty(), !s.dirty().is_empty());
            }
        }
    }
}
