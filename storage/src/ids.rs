//! Typed identities. Every one of them ends up inside an object key, so the
//! string ones are validated once, here, and can be trusted everywhere else.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::StorageError;

/// A checkpoint's number within a job. Checkpoints are ordered by it; a
/// manifest for `n` commits checkpoint `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CheckpointId(pub u64);

impl CheckpointId {
    /// The id after this one.
    pub fn next(self) -> CheckpointId {
        CheckpointId(self.0 + 1)
    }
}

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The supervisor's term. Every commit carries one; a commit with an epoch
/// lower than one already seen for the job is fenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Longest name accepted for a job or worker: keys stay well under the
/// 1024-byte S3 key limit even with a long store prefix.
const MAX_NAME_LEN: usize = 128;

fn validate_name(what: &'static str, value: &str) -> Result<(), StorageError> {
    let reason = if value.is_empty() {
        Some("must not be empty".to_string())
    } else if value.len() > MAX_NAME_LEN {
        Some(format!("must be at most {MAX_NAME_LEN} bytes"))
    } else if value.starts_with('.') {
        Some("must not start with '.'".to_string())
    } else {
        value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            .map(|c| {
                format!("contains {c:?}; only ASCII letters, digits, '-', '_' and '.' are allowed")
            })
    };
    match reason {
        Some(reason) => Err(StorageError::InvalidName {
            what,
            value: value.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `value` (ASCII letters, digits, `-`, `_`, `.`; 1 to 128
            /// bytes; not starting with `.`).
            pub fn new(value: impl Into<String>) -> Result<Self, StorageError> {
                let value = value.into();
                validate_name($what, &value)?;
                Ok(Self(value))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = StorageError;
            fn try_from(value: String) -> Result<Self, StorageError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }
    };
}

name_type!(
    /// A job's name: the unit whose checkpoints are stored together.
    JobId,
    "job name"
);
name_type!(
    /// A worker's name within a job, for example `counter-1`.
    WorkerId,
    "worker name"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_accept_plain_identifiers() {
        assert!(JobId::new("wordcount-2.v1_a").is_ok());
        assert!(WorkerId::new("counter-0").is_ok());
    }

    #[test]
    fn test_names_reject_path_tricks_and_say_why() {
        for bad in ["", ".", "..", "a/b", "a b", "ö", &"x".repeat(129)] {
            let err = JobId::new(bad).expect_err(bad);
            assert!(err.to_string().contains("job name"), "{err}");
        }
    }
}
