pub mod plan;

use weightlift::setup::SetupError;

/// A command's failure and the exit code it maps to: 2 for a plan that cannot be made or
/// options that do not fit (like clap's usage errors), 1 for unreadable inputs.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("{0}")]
    Io(String),
}

impl CommandError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Setup(SetupError::Plan(_) | SetupError::Invalid(_)) => 2,
            CommandError::Setup(SetupError::Source(_)) | CommandError::Io(_) => 1,
        }
    }
}
