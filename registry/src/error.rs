//! Errors of the registry, grouped by who is at fault: the caller (bad or
//! unauthenticated input), the state (exhausted, conflict) or us (storage,
//! crypto, corrupt data).

/// A registry error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed input: a bad CSR, prefix, parameter or document.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A request that is not authenticated, or whose signature is wrong.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Authenticated but not allowed (revoked node, admin from afar, ...).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Something that does not exist (token, node, serial).
    #[error("not found: {0}")]
    NotFound(String),
    /// A conflict with the current state (token already exists, ...).
    #[error("conflict: {0}")]
    Conflict(String),
    /// No free prefix of the requested length.
    #[error("exhausted: {0}")]
    Exhausted(String),
    /// Stored data that makes no sense.
    #[error("corrupt registry data: {0}")]
    Corrupt(String),
    /// SQLite.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// Certificate generation or parsing.
    #[error("certificate: {0}")]
    Cert(String),
    /// A file or socket operation.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Allowed, but not again so soon (a rate limit).
    #[error("too soon: {0}")]
    TooSoon(String),
    /// A request body over the size limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The registry could not be reached or answered garbage (client side).
    #[error("registry request failed: {0}")]
    Transport(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The message without the category prefix (for `detail` in JSON answers).
    pub fn detail(&self) -> String {
        match self {
            Self::Invalid(m)
            | Self::Unauthenticated(m)
            | Self::Forbidden(m)
            | Self::NotFound(m)
            | Self::Conflict(m)
            | Self::Exhausted(m)
            | Self::TooLarge(m)
            | Self::TooSoon(m) => m.clone(),
            other => other.to_string(),
        }
    }

    /// A short machine-readable code, used as `error` in JSON answers.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Exhausted(_) => "exhausted",
            Self::TooLarge(_) => "too_large",
            Self::TooSoon(_) => "too_soon",
            Self::Corrupt(_) | Self::Db(_) | Self::Cert(_) | Self::Io { .. } => "internal",
            Self::Transport(_) => "transport",
        }
    }
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Self::Cert(e.to_string())
    }
}

/// Result type of the registry.
pub type Result<T, E = Error> = std::result::Result<T, E>;
