//! One error type for the crate. Messages read "what: expected X, got Y"; the Python binding maps
//! each variant to one Python exception class in one place.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A shape, range or value is not acceptable (Python `ValueError`).
    Value(String),
    /// The fast method cannot certify the requested accuracy or fit the memory limit
    /// (Python `fastrope.ApproximationError`, a `ValueError`).
    Approximation(String),
    /// The working set cannot be allocated (Python `MemoryError`).
    Memory(String),
    /// The computation was cancelled (Ctrl-C); the binding re-raises the pending Python signal.
    Cancelled,
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Value(m) | Error::Approximation(m) | Error::Memory(m) => f.write_str(m),
            Error::Cancelled => f.write_str("cancelled"),
        }
    }
}

impl std::error::Error for Error {}

/// `Err(Error::Value(...))` with a formatted message.
#[macro_export]
macro_rules! value_error {
    ($($arg:tt)*) => { Err($crate::error::Error::Value(format!($($arg)*))) };
}
