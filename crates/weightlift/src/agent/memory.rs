//! What the agent needs from tagged GPU memory to release and resume it by tag.

/// The tag of the weights' memory: updates are refused while it is released.
pub const WEIGHTS_TAG: &str = "weights";

/// Tagged memory an engine can release and take back (a pool of CUDA VMM memory). An agent
/// without one answers the memory endpoints with 501.
pub trait MemoryControl: Send + Sync {
    /// Releases the memory of `tags` (every tag when empty); returns bytes paused per tag.
    fn release(&self, tags: &[String]) -> Result<Vec<(String, u64)>, MemoryError>;
    /// Maps memory for `tags` again (every tag when empty); returns bytes paused per tag.
    fn resume(&self, tags: &[String]) -> Result<Vec<(String, u64)>, MemoryError>;
    /// Bytes paused per tag now (0 for an active tag).
    fn paused(&self) -> Vec<(String, u64)>;
    /// Whether `tag`'s memory is released now (a tag that keeps its pages may be paused with
    /// 0 bytes given back).
    fn is_paused(&self, tag: &str) -> bool {
        self.paused().iter().any(|(t, bytes)| t == tag && *bytes > 0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("unknown memory tag `{0}`")]
    UnknownTag(String),
    /// The call could not be carried out (e.g. not enough free memory to resume); nothing
    /// changed.
    #[error("{0}")]
    Refused(String),
}
