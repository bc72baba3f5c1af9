//! The re6st-rs trust model and registry.

pub mod cert;
pub mod error;
pub mod prefix;

pub use error::{Error, Result};
