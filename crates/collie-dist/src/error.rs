//! Errors of a parallel layout.

use thiserror::Error;

/// What can go wrong setting up or running a parallel layout.
#[derive(Debug, Error)]
pub enum DistError {
    /// The requested layout does not fit the world or the model (the message names the factor).
    #[error("parallel layout: {0}")]
    Layout(String),
    /// MPI could not be initialized.
    #[error("MPI: {0}")]
    Mpi(String),
}
