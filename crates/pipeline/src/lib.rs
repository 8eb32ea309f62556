//! The EasyPhoto train and infer flows, composed from the `easyphoto-*` crates.
//!
//! - [`user`]: user ids (validated before they name files), the per-user file layout, and
//!   atomic writes of outputs.
//! - [`error`]: the crate's error type.

pub mod error;
pub mod user;

pub use error::{PipelineError, Result};
pub use user::{UserId, UserStore, write_atomic};
