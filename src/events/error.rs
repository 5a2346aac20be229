use thiserror::Error;

use crate::rules::UnknownEventType;

/// Why a request body is not a valid event. Every variant but the first two
/// names the field, as a path into the body (`Records[0].s3.object.key`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EventError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error(
        "unrecognised event body (found {found}): expected an S3 event notification \
         {{\"Records\": [...]}} or a QingStor event {{\"event_type\", \"bucket_name\", \
         \"object_key\"}}, or a list of QingStor events"
    )]
    UnknownFormat { found: String },
    #[error("{field}: required field is missing")]
    MissingField { field: String },
    #[error("{field}: expected {expected}, got {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: String,
    },
    #[error("{field}: must not be empty")]
    Empty { field: String },
    #[error("{field}: {source}")]
    UnknownEventType {
        field: String,
        source: UnknownEventType,
    },
    #[error("{field}: {bytes} bytes, at most {limit}")]
    TooLong {
        field: String,
        bytes: usize,
        limit: usize,
    },
    #[error("{field}: invalid object key `{key}`: {reason}")]
    InvalidKey {
        field: String,
        key: String,
        reason: &'static str,
    },
}

impl EventError {
    /// A JSON object that is no known event format, named by its first keys.
    pub(crate) fn unknown_object(
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> EventError {
        EventError::UnknownFormat {
            found: fields
                .keys()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}
